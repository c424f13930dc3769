"""Speech over the assistant: does it cut the reply off, continue the user's last turn, or is it the
assistant's own voice (app/core/echo.py)? What the conversation (app/core/conversation.py) decides when the
listener hears the user while a reply is on its way or playing.
"""

from __future__ import annotations

import time
from typing import Literal

import numpy as np

from app.core.answering import Answering
from app.core.events import Options
from app.core.memory import Memory
from app.core.turns import TurnSettings

Cut = Literal["continued", "speech", "kept"]


def cut_by_speech(
    answering: Answering, memory: Memory, t_onset: float | None, settings: TurnSettings, options: Options
) -> tuple[Cut | None, np.ndarray | None]:
    """Why speech that began at `t_onset` (perf_counter(); None: now) stops the reply, if one is on its way
    or playing, and the speech of the user's turn it continues (else None).

    "kept": the user's options turn barge-in off: the reply goes on, and the speech is a turn of its own.

    "continued": it began before the reply played, or within `within_s` of its start; too soon to be an
    answer to it, so the user had not finished and their turn was ended too early: both parts are answered
    as one turn and the reply is void. A reply all sent but playing then leaves the history here (the strict
    gate may accept the speech after it played out). "speech": the user talks over a reply they heard."""
    if not options.barge_in and (answering.busy or memory.still_playing()):
        return "kept", None
    t_onset, within_s = time.perf_counter() if t_onset is None else t_onset, settings.continue_within_s
    if (active := answering.active) is not None:
        turn, reply = active
        if turn.audio is not None and reply.continued_by(t_onset, within_s):
            return "continued", turn.audio
        return "speech", None
    if (audio := memory.take_back(t_onset, within_s)) is not None:
        return "continued", audio
    return ("speech", None) if answering.busy or memory.still_playing() else (None, None)

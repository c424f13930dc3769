"""A response's usage, as OpenAI counts it: the language model's own text tokens, and audio estimated by time.

Our models read and write text; audio tokens are what OpenAI's own models would have been charged for the
same audio, from its published rates for realtime audio: one token per 100 ms of the user's audio, one per
50 ms of the assistant's. The audio counted on input is the user audio this response heard (the audio
items it answered), not older audio of the history: our language model reads those as their transcripts,
which its text tokens already count.
"""

from __future__ import annotations

import math

from app.web.realtime import protocol as rt

USER_AUDIO_TOKENS_PER_S = 10
ASSISTANT_AUDIO_TOKENS_PER_S = 20


def usage(text_tokens: tuple[int, int], heard_s: float, spoken_s: float) -> rt.ResponseUsage:
    """`text_tokens`: the language model's (prompt, reply); `heard_s`: seconds of user audio answered;
    `spoken_s`: seconds of voice sent."""
    text_in, text_out = text_tokens
    audio_in = math.ceil(heard_s * USER_AUDIO_TOKENS_PER_S)
    audio_out = math.ceil(spoken_s * ASSISTANT_AUDIO_TOKENS_PER_S)
    given, made = text_in + audio_in, text_out + audio_out
    return rt.ResponseUsage(
        total_tokens=given + made, input_tokens=given, output_tokens=made,
        input_token_details=rt.InputDetails(text_tokens=text_in, audio_tokens=audio_in),
        output_token_details=rt.OutputDetails(text_tokens=text_out, audio_tokens=audio_out),
    )

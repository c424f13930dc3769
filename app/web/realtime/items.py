"""conversation.item.* and response.*: the user items the client adds, and the responses that answer
them, each as one turn of the conversation core."""

from __future__ import annotations

import msgspec
import numpy as np

from app.audio import ASR_RATE
from app.core.conversation import Conversation
from app.core.limits import LimitSettings
from app.web.realtime import protocol as rt
from app.web.realtime.audio_in import InputAudio
from app.web.realtime.errors import Refused
from app.web.realtime.replies import Replies, UserItem, new_id


class Items:
    """The user items waiting for a response, and the client's ways to answer, cancel and truncate."""

    def __init__(self, conversation: Conversation, replies: Replies, audio: InputAudio, limits: LimitSettings) -> None:
        self.conversation = conversation
        self.replies = replies
        self.audio = audio
        self.limits = limits
        self._pending: list[UserItem] = []  # user items that response.create will answer

    def create(self, wanted: rt.ItemIn) -> list[rt.ServerEvent]:
        if wanted.type != "message" or wanted.role != "user" or len(wanted.content) != 1:
            raise Refused("unsupported", "item")
        (part,) = wanted.content
        item_id = wanted.id or new_id("item")
        if part.type == "input_text" and part.text and part.text.strip():
            if len(part.text) > self.limits.max_text_chars:
                raise Refused("too_long", "item.content")
            return self.add(UserItem(item_id, text=part.text.strip()))
        if part.type == "input_audio" and part.audio:
            pcm = self.audio.whole(part.audio)  # in the session's input format
            if len(pcm) > self.audio.max_turn_s * ASR_RATE:
                raise Refused("too_long", "item.content")
            return self.add(UserItem(item_id, audio=pcm, seconds=len(pcm) / ASR_RATE))
        raise Refused("invalid_event", "item.content")

    def add(self, item: UserItem) -> list[rt.ServerEvent]:
        self._pending.append(item)
        return self.replies.user_item_added(item)

    def respond(self, params: rt.ResponseParams | None) -> None:
        """Answer the user items added since the last response, as one turn of the core."""
        if params is not None and (params.conversation == "none" or params.input is not None):
            raise Refused("unsupported", "response.conversation" if params.conversation == "none"
                          else "response.input")
        if self.replies.active:
            raise Refused("conversation_already_has_active_response")
        items, self._pending = self._pending, []
        if not items:
            raise Refused("no_input")
        audio = [item.audio for item in items if item.audio is not None]
        if audio and len(audio) < len(items):
            raise Refused("unsupported", "item.content")  # typed and spoken in one turn: not in the core
        if self.conversation.memory.still_playing():
            # The protocol's rule: a reply the client did not truncate was heard whole. Without this
            # the core would cut it by its playback clock, as for the page's typing over its voice.
            self.conversation.interrupt(self.replies.last_reply_samples)
        self.replies.request(items, spoken=bool(audio))
        if audio:
            self._answer_audio(np.concatenate(audio))
        else:
            self.conversation.say("\n".join(item.text or "" for item in items))

    def _answer_audio(self, pcm: np.ndarray) -> None:
        self.audio.stop_listening()
        options = self.conversation.options
        self.conversation.configure(msgspec.structs.replace(options, mode="push_to_talk", answer_speech=True))
        listener = self.conversation.listen()  # push-to-talk: the turn is exactly this audio
        listener.feed(pcm)
        listener.end()
        self.conversation.stop_listening()
        self.conversation.configure(options)  # the ended listener keeps push-to-talk

    def cancel(self) -> None:
        if not self.replies.active:
            raise Refused("response_cancel_not_active")
        if self.replies.cancel():
            self.conversation.interrupt(None, cause="client")

    def truncate(self, event: rt.ItemTruncate, sample_rate: int) -> list[rt.ServerEvent]:
        """The client played `audio_end_ms` of the latest reply: the history keeps what was heard.
        `sample_rate` is the voice's own: the core counts the reply in its samples."""
        if event.item_id != self.replies.last_reply_item or event.audio_end_ms < 0:
            raise Refused("item_not_found", "item_id")
        if self.replies.truncating(event.item_id):
            self.conversation.interrupt(event.audio_end_ms * sample_rate // 1000)
        return [rt.ItemTruncated(item_id=event.item_id, content_index=event.content_index,
                                 audio_end_ms=event.audio_end_ms)]

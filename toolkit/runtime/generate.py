"""What generation raises when a prompt does not fit (the API, `phi3 chat` and the server catch it). The
generation itself: `request.Generation` per sequence, driven by `toolkit.api` (one-shot, streams, chats)."""

from __future__ import annotations

from ..errors import UserError


class PromptTooLongError(UserError):
    """The prompt (with the conversation so far) does not fit the context window: nothing was generated."""

"""What the model will be asked to do: the workload the planner sizes memory for."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Final

from omnifix._checks import require_flags
from omnifix.errors import InvalidArgumentError

__all__ = ["AUDIO_TOKENS_PER_SECOND", "Workload", "require_workload"]

#: Language-model tokens per second of audio (Qwen2-Audio and Qwen2.5-Omni: 100 mel frames/s,
#: a stride-2 conv, then 2x average pooling).
AUDIO_TOKENS_PER_SECOND: Final = 25


@dataclass(frozen=True, kw_only=True)
class Workload:
    """What the model will be asked to do; sizes the KV cache and activation peak.

    All token counts are per sample; ``batch_size`` multiplies them. Media are converted to
    language-model tokens the way the Qwen processors do: images as given (``image_tokens``, after
    the 2x2 merge: a 448x448 image is 256), video at ``video_tokens_per_second`` (2 frames per
    second merged into one temporal patch; the default 256 is 448x448 frames), audio at 25 tokens
    per second. ``audio_output`` also counts the Qwen2.5-Omni talker's KV cache and prefill.

    Raises:
        InvalidArgumentError: A negative or infinite count, a batch size below 1, or an
            ``audio_output`` that is not ``True`` or ``False``.

    Example:
        >>> import omnifix
        >>> work = omnifix.Workload(text_tokens=1000, video_seconds=15, audio_seconds=30)
        >>> work.video_tokens, work.audio_tokens, work.prompt_tokens
        (3840, 750, 5590)
    """

    batch_size: int = 1
    text_tokens: int = 512
    image_tokens: int = 0
    video_seconds: float = 0.0
    audio_seconds: float = 0.0
    max_new_tokens: int = 256
    video_tokens_per_second: int = 256
    audio_output: bool = False

    def __post_init__(self) -> None:
        """Refuse counts that cannot be."""
        require_flags(audio_output=self.audio_output)
        for name in (field.name for field in fields(self) if field.name != "audio_output"):
            value = getattr(self, name)
            lowest = 1 if name in ("batch_size", "video_tokens_per_second") else 0
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < lowest:
                raise InvalidArgumentError(
                    f"Workload({name}={value!r}) is not a valid count. Pass a number >= {lowest}."
                )
            if not math.isfinite(value):  # nan compares False with everything: checked apart
                raise InvalidArgumentError(
                    f"Workload({name}={value!r}) is not a valid count. Pass a finite number "
                    f">= {lowest}."
                )
            if name not in ("video_seconds", "audio_seconds") and not isinstance(value, int):
                raise InvalidArgumentError(
                    f"Workload({name}={value!r}) must be a whole number. Pass an int, e.g. "
                    f"{name}={math.ceil(value)}."
                )

    @property
    def video_tokens(self) -> int:
        """Language-model tokens of the video, per sample."""
        return math.ceil(self.video_seconds * self.video_tokens_per_second)

    @property
    def audio_tokens(self) -> int:
        """Language-model tokens of the audio, per sample."""
        return math.ceil(self.audio_seconds * AUDIO_TOKENS_PER_SECOND)

    @property
    def prompt_tokens(self) -> int:
        """Every language-model input token, per sample."""
        return self.text_tokens + self.image_tokens + self.video_tokens + self.audio_tokens

    def __str__(self) -> str:
        """``batch 1 x (512 text + 3840 video (15 s) tokens) + 256 new tokens``."""
        parts = [f"{self.text_tokens} text"]
        if self.image_tokens:
            parts.append(f"{self.image_tokens} image")
        if self.video_seconds:
            parts.append(f"{self.video_tokens} video ({self.video_seconds:g} s)")
        if self.audio_seconds:
            parts.append(f"{self.audio_tokens} audio ({self.audio_seconds:g} s)")
        speech = ", with speech output" if self.audio_output else ""
        return (
            f"batch {self.batch_size} x ({' + '.join(parts)} tokens) + "
            f"{self.max_new_tokens} new tokens{speech}"
        )


def require_workload(workload: object) -> None:
    """Refuse anything but a :class:`Workload` or ``None`` (the planner's default)."""
    if workload is not None and not isinstance(workload, Workload):
        raise InvalidArgumentError(
            f"workload={workload!r} is not an omnifix.Workload. Pass e.g. "
            "Workload(text_tokens=8192, image_tokens=1280), or None for the planner's default."
        )

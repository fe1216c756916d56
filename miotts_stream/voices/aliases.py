"""Voice aliases: other names for a preset or a stored voice.

Clients written for OpenAI's speech API (Pipecat's and LiveKit's OpenAI TTS services among
them) accept only OpenAI's 13 voice names, and refuse any other before a request leaves the
client. So each of those names is an alias of one of the English presets, chosen by how
OpenAI describes the voice (`OPENAI_VOICE_ALIASES`); `--voice-alias NAME=VOICE` adds more or
points one elsewhere, at a preset or at a stored voice. An alias is resolved where a voice is
named (a preset name or a stored voice id, on every transport) and is listed with the voices.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from miotts_stream.errors import FieldError

from .store import check_voice_id

# OpenAI's voices (its speech API, 2026), each as the English preset nearest to how OpenAI
# describes it: the female and the gender-neutral ones as en_female, the male ones as en_male.
OPENAI_VOICE_ALIASES: dict[str, str] = {
    "alloy": "en_female",
    "ash": "en_male",
    "ballad": "en_male",
    "cedar": "en_male",
    "coral": "en_female",
    "echo": "en_male",
    "fable": "en_male",
    "marin": "en_female",
    "nova": "en_female",
    "onyx": "en_male",
    "sage": "en_female",
    "shimmer": "en_female",
    "verse": "en_male",
}


def parse_voice_alias(value: str) -> tuple[str, str]:
    """`NAME=VOICE` from the command line; ValueError (argparse reports it) otherwise."""
    name, sep, voice = value.partition("=")
    if not sep or not name or not voice:
        raise ValueError(f"expected NAME=VOICE, got {value!r}")
    try:
        check_voice_id(name, "NAME")
        check_voice_id(voice, "VOICE")
    except FieldError as err:
        raise ValueError(str(err)) from None
    return name, voice


@dataclass(frozen=True)
class VoiceAliases:
    """Alias name -> the voice it stands for (a preset's name or a stored voice's id)."""

    targets: Mapping[str, str]

    @classmethod
    def build(cls, extra: Mapping[str, str], presets) -> VoiceAliases:
        """OpenAI's names, then `extra` (--voice-alias) over them. ValueError naming the flag
        for an alias that shadows a preset (the preset would win, silently) or an alias of an
        alias; a stored voice named as a target is looked up when it is used."""
        # A preset of that name (a --presets-dir file called alloy.pt) keeps its name.
        targets = {
            name: voice for name, voice in OPENAI_VOICE_ALIASES.items() if name not in presets
        }
        for name, voice in extra.items():
            if name in presets:
                raise ValueError(f"--voice-alias {name}={voice}: {name} is a preset's name")
            targets[name] = voice
        for name, voice in targets.items():
            if voice in targets:
                raise ValueError(
                    f"--voice-alias {name}={voice}: {voice} is itself an alias; name a preset "
                    "or a stored voice"
                )
        return cls(targets)

    def __contains__(self, name: str) -> bool:
        return name in self.targets

    def target(self, name: str) -> str:
        """The voice `name` stands for; `name` itself when it is no alias."""
        return self.targets.get(name, name)

    def names(self) -> list[str]:
        return sorted(self.targets)

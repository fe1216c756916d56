"""The server's options are declared once (miotts_stream/service/options.py): the command line,
its defaults and help, and the docs' flag tables are derived from the declaration, so none of
them can drift from it."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

import server
from miotts_stream.service.options import (
    ServerOptions,
    argument_parser,
    flag_name,
    option_fields,
    option_groups,
    with_flag_tables,
)

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def declared_flags() -> set[str]:
    flags = set()
    for _, group in option_groups():
        for f in option_fields(group):
            flags.add(flag_name(f))
            if f.metadata["flag"].off:
                flags.add(f.metadata["flag"].off)
    return flags | {"--log-level"}  # server.py's own


def test_the_readmes_flag_tables_are_the_declarations():
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"<!-- flags: (\w+) -->", readme)
    assert {"access", "limits", "http"} <= set(blocks)
    assert with_flag_tables(readme) == readme, (
        "the README's flag tables differ from the declaration: run "
        "`python -m miotts_stream.service.options README.md`"
    )


@pytest.mark.parametrize("doc", DOCS, ids=[d.name for d in DOCS])
def test_every_server_flag_a_doc_tabulates_exists(doc):
    """A table row that starts with a flag (README, docs/deploy.md's fleet settings ...) names
    a flag the server has."""
    flags = declared_flags()
    for line in doc.read_text().splitlines():
        if not line.startswith("| `--"):
            continue
        first_cell = line.split("|")[1]
        for flag in re.findall(r"--[a-z][a-z0-9-]*\*?", first_cell):
            if flag.endswith("*"):  # `--tls-*`: some flag starts so
                assert any(f.startswith(flag[:-1]) for f in flags), f"{doc.name}: {line}"
            else:
                assert flag in flags, f"{doc.name}: {line}"


def test_every_option_is_a_flag_with_its_declared_default():
    assert server.parse_args([]) == ServerOptions()
    parser_flags = {name for action in argument_parser()._actions for name in action.option_strings}
    assert declared_flags() - {"--log-level"} <= parser_flags
    # key_store.py documents --api-keys-refresh-s; it once had no flag.
    assert server.parse_args(["--api-keys-refresh-s", "5"]).access.api_keys_refresh_s == 5
    # Every field is declared with its help, and each flag is spelled once.
    names = [flag_name(f) for _, g in option_groups() for f in option_fields(g)]
    assert len(names) == len(set(names))
    for _, group in option_groups():
        for f in dataclasses.fields(group):
            assert "flag" in f.metadata and f.metadata["flag"].help, f.name


def test_options_by_their_flat_names_go_to_their_groups():
    options = ServerOptions().with_values(max_streams=4, api_keys=("k",), http_port=None)
    assert options.limits.max_streams == 4 and options.access.api_keys == ("k",)
    assert options.network.http_port is None and options.network.port == 50051
    assert ServerOptions().limits.max_streams == 16  # a copy: the original is unchanged
    with pytest.raises(TypeError, match=r"max_stream\b"):
        ServerOptions().with_values(max_stream=4)


def test_voice_aliases_on_the_command_line():
    options = server.parse_args(
        ["--voice-alias", "narrator=alice", "--voice-alias", "alloy=en_male"]
    )
    assert options.voices.voice_aliases == {"narrator": "alice", "alloy": "en_male"}
    for bad in ("narrator", "=alice", "Narrator=alice", "narrator=Alice!"):
        with pytest.raises(SystemExit):
            server.parse_args(["--voice-alias", bad])


def test_an_alias_may_not_shadow_a_preset_or_name_an_alias():
    from miotts_stream.codec.voices import VoiceLibrary
    from miotts_stream.voices.aliases import OPENAI_VOICE_ALIASES, VoiceAliases

    presets = VoiceLibrary()
    aliases = VoiceAliases.build({"alloy": "my_voice"}, presets)
    assert aliases.target("alloy") == "my_voice" and aliases.target("nova") == "en_female"
    assert set(aliases.names()) == set(OPENAI_VOICE_ALIASES)
    with pytest.raises(ValueError, match="en_male is a preset"):
        VoiceAliases.build({"en_male": "en_female"}, presets)
    with pytest.raises(ValueError, match="nova is itself an alias"):
        VoiceAliases.build({"narrator": "nova"}, presets)

"""Access configuration on its own: key files, TLS option pairs, what counts as loopback."""

from __future__ import annotations

import pytest

from miotts_stream.service.access import AccessError, AccessPolicy
from miotts_stream.service.options import AccessOptions
from miotts_stream.service.server import is_loopback

# ---- configuration ------------------------------------------------------------------------


def test_key_file_lines(tmp_path):
    path = tmp_path / "keys"
    path.write_text("k" * 12 + " name=ops max_streams=3\n# x\n" + "m" * 12 + "\n")
    policy = AccessPolicy.from_options(["c" * 10], str(path))
    assert [(k.name, k.max_streams) for k in policy.keys] == [
        ("cli-1", None),
        ("ops", 3),
        ("key-3", None),
    ]
    assert policy.authenticate("Bearer " + "k" * 12).name == "ops"
    assert policy.authenticate("Bearer " + "k" * 11) is None
    assert policy.authenticate(None) is None
    assert "k" * 12 not in repr(policy)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("short", "at least 8 characters"),
        ("k" * 12 + " max_streams=0", "max_streams must be a positive integer"),
        ("k" * 12 + " color=red", "unknown option 'color'"),
        ("k" * 12 + " loose", "expected NAME=VALUE"),
    ],
)
def test_bad_key_lines_are_refused(tmp_path, line, message):
    path = tmp_path / "keys"
    path.write_text(line + "\n")
    with pytest.raises(AccessError, match=message):
        AccessPolicy.from_options([], str(path))


def test_tls_options_go_together(tmp_path):
    pem = tmp_path / "x.pem"
    pem.write_text("not read")
    with pytest.raises(ValueError, match="--tls-cert and --tls-key go together"):
        AccessOptions(tls_cert=str(pem)).server_credentials()
    with pytest.raises(ValueError, match="--tls-client-ca needs"):
        AccessOptions(tls_client_ca=str(pem)).server_credentials()


@pytest.mark.parametrize(
    ("host", "loopback"),
    [("127.0.0.1", True), ("::1", True), ("localhost", True), ("0.0.0.0", False),
     ("10.1.2.3", False), ("::", False), ("example.com", False)],
)  # fmt: skip
def test_plaintext_warning_applies_off_loopback(host, loopback):
    assert is_loopback(host) is loopback


def test_a_rotated_key_file_is_read_again_and_a_broken_one_changes_nothing(tmp_path):
    """Replicas share keys through one file (a mounted secret); SIGHUP calls reload()."""
    path = tmp_path / "keys"
    path.write_text("old-key-123 name=ops\n")
    policy = AccessPolicy.from_options([], str(path))
    assert policy.authenticate("Bearer old-key-123").name == "ops"

    path.write_text("new-key-456 name=ops\n")
    policy.reload()
    assert policy.authenticate("Bearer old-key-123") is None
    assert policy.authenticate("Bearer new-key-456").name == "ops"

    for broken in ("# every key removed\n", "short\n"):
        path.write_text(broken)
        with pytest.raises(AccessError):
            policy.reload()
        assert policy.authenticate("Bearer new-key-456").name == "ops"  # still in force
    path.unlink()
    with pytest.raises(OSError):
        policy.reload()
    assert policy.enabled

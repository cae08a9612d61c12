"""The tokens file (jobserver/auth.load_tokens): what a slip in it does is refused at start, naming its line."""

import pytest

from trainmetrics.jobserver.auth import load_tokens

ALICE, BOB = "alice-token-0123456789", "bob-token-0123456789ab"


def load(tmp_path, text: str, encoding: str = "utf-8"):
    path = tmp_path / "tokens"
    path.write_text(text, encoding=encoding)
    return load_tokens(path)


def test_one_token_for_two_owners_is_refused_naming_both_lines(tmp_path):
    # Before: the second line won in silence, and alice's token acted as bob (his jobs, his downloads).
    with pytest.raises(ValueError, match="line 3: the token of line 1 again"):
        load(tmp_path, f"{ALICE} alice\n# bob\n{ALICE} bob\n")


@pytest.mark.parametrize("token", ["alice-token-\x01123456789", "alice-token-\x7f123456789", "alice-tökenn-0123456789"])
def test_a_token_no_header_can_carry_is_refused(tmp_path, token):
    with pytest.raises(ValueError, match="line 1: .*visible ASCII"):
        load(tmp_path, f"{token} alice\n")


def test_a_hash_inside_a_token_is_part_of_it_and_one_after_a_space_starts_a_comment(tmp_path):
    tokens = load(tmp_path, f"abc#def-0123456789012 alice  # alice's laptop\n#{BOB} bob\n{BOB} bob #\n")
    assert tokens == {b"abc#def-0123456789012": "alice", BOB.encode(): "bob"}


def test_a_byte_order_mark_is_not_part_of_the_first_token(tmp_path):
    assert load(tmp_path, f"{ALICE} alice\n", encoding="utf-8-sig") == {ALICE.encode(): "alice"}

"""The tokens file (jobserver/auth.load_tokens): what a slip in it does is refused at start, naming its line."""

import pytest

from trainmetrics.edge import ApiError
from trainmetrics.jobserver.auth import TokenAuth, exposure, load_tokens

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


@pytest.mark.parametrize("breaker", ["\x0c", "\x0b", "\x1c", "\x85", "\u2028", "\u2029"])
def test_a_comment_holding_a_character_python_splits_lines_at_is_all_comment(tmp_path, breaker):
    """str.splitlines() ends a line at a form feed, NEL or U+2028 too, which no editor shows as a line break: the
    rest of a comment after one was a line of its own, and a token commented out there was in force."""
    assert load(tmp_path, f"# revoked{breaker}{BOB} bob\n{ALICE} alice\n") == {ALICE.encode(): "alice"}


def test_a_bad_line_is_named_by_its_number_in_the_file_whatever_a_comment_above_holds(tmp_path):
    """A U+2028 in a comment counted as a line break: the comment's rest was the bad line, named as line 2 (a
    comment), and every line after it was numbered one past its place."""
    with pytest.raises(ValueError, match="line 3: expected 'TOKEN OWNER'"):
        load(tmp_path, f"# alice\u2028s laptop\n{ALICE} alice\nnot a tokens line\n")


def test_windows_and_old_mac_line_endings_are_line_breaks(tmp_path):
    """(Lines no longer end where str.splitlines() ends them: CR LF and a lone CR still end one.)"""
    expected = {ALICE.encode(): "alice", BOB.encode(): "bob"}
    for breaker in ("\r\n", "\r"):
        text = f"# owners{breaker}{ALICE} alice{breaker}{breaker}{BOB} bob{breaker}"
        (tmp_path / "tokens").write_bytes(text.encode())
        assert load_tokens(tmp_path / "tokens") == expected, repr(breaker)


def test_a_byte_order_mark_is_not_part_of_the_first_token(tmp_path):
    assert load(tmp_path, f"{ALICE} alice\n", encoding="utf-8-sig") == {ALICE.encode(): "alice"}


def test_a_file_that_is_not_utf8_is_refused_naming_its_line(tmp_path):
    # Before: the codec's own words, "'utf-8' codec can't decode byte 0xff in position 49", and no line.
    path = tmp_path / "tokens"
    path.write_bytes(f"{ALICE} alice\n".encode() + b"bob-token-\xff0123456789 bob\n")
    with pytest.raises(ValueError, match=r"tokens: line 2: not UTF-8 text \(byte 0xff\)"):
        load_tokens(path)


def test_a_file_with_a_byte_order_mark_that_is_not_utf8_names_the_right_line(tmp_path):
    # The codec's positions start after the mark: counted in the file's bytes, line 2's bad byte was line 1's.
    path = tmp_path / "tokens"
    path.write_bytes(b"\xef\xbb\xbf" + f"{ALICE} alice\n".encode() + b"\xff" + f"{BOB} bob\n".encode())
    with pytest.raises(ValueError, match=r"tokens: line 2: not UTF-8 text \(byte 0xff\)"):
        load_tokens(path)


def test_tokens_are_found_by_digest_and_not_kept(tmp_path):
    """Compared one by one, a token's place among the others and every token's length showed in the time of the
    answer; found by its SHA-256 digest, the time tells nothing, and the tokens themselves are not held."""
    auth = TokenAuth(load(tmp_path, f"{ALICE} alice\n{BOB} bob\n"))
    assert auth.owner(f"Bearer {BOB}") == "bob" and auth.owner(f"bearer  {ALICE} ") == "alice"
    for wrong in (f"Bearer {ALICE[:-1]}", f"Bearer {ALICE}x", "Bearer ", f"Basic {ALICE}", None, "Bearer \udcff"):
        with pytest.raises(ApiError):
            auth.owner(wrong)
    held = repr(vars(auth)).encode()
    assert ALICE.encode() not in held and BOB.encode() not in held


def test_a_changed_tokens_file_takes_effect_without_a_restart(tmp_path):
    """The file was read once, at the start: a leaked token kept working until the server restarted, and a
    restart pauses every running job. A token removed stops within a second or two, one added starts, and a file
    written wrong leaves the tokens as they were, said in the log."""
    import time

    from tests.jobserver.server_process import TOKENS, Server, write_tokens

    tokens = write_tokens(tmp_path / "tokens")
    server = Server(tmp_path, extra=("--tokens", str(tokens))).start()
    carol = "carol-token-0123456789"

    def answers(token: str) -> int:
        return server.client().get("/api/training/jobs", headers={"Authorization": f"Bearer {token}"}).status_code

    def becomes(token: str, status: int) -> None:
        deadline = time.monotonic() + 10
        while answers(token) != status:
            assert time.monotonic() < deadline, (token, status)
            time.sleep(0.1)

    try:
        assert answers(TOKENS["alice"]) == 200 and answers(carol) == 401
        tokens.write_text(f"{TOKENS['bob']} bob\n{carol} carol\n")        # alice's revoked, carol's added
        becomes(TOKENS["alice"], 401)
        becomes(carol, 200)
        assert answers(TOKENS["bob"]) == 200
        tokens.write_text(f"{carol} carol\nnot a tokens line\n")
        time.sleep(2.5)                    # past the next look at the file
        assert answers(carol) == 200 and answers(TOKENS["bob"]) == 200      # the tokens as they were
    finally:
        server.stop()
    log = (tmp_path / "server.log").read_text()
    assert "tokens file changed but cannot be used" in log and "line 2" in log, log[-2000:]


def test_a_tokens_file_other_users_may_read_is_said_at_the_start(tmp_path):
    """A tokens file written with the default umask (0644) let every user of the machine read every owner's token,
    and nothing said so."""
    path = tmp_path / "tokens"
    path.write_text(f"{ALICE} alice\n")
    for mode, said in ((0o644, True), (0o640, True), (0o606, True), (0o600, False), (0o400, False)):
        path.chmod(mode)
        assert (exposure(path) is not None) == said, oct(mode)
    path.chmod(0o644)
    assert exposure(path) == (f"--tokens {path}: other users of this machine may read or change it (mode 0644): "
                              "whoever reads it can act as any owner; chmod 600 it")


def test_the_last_token_revoked_lets_no_one_in_and_an_exposed_replacement_is_said(tmp_path, monkeypatch, caplog):
    """A changed file holding no token (its last one commented out to revoke it, or the file emptied) was refused
    as "no tokens", and the tokens read before stayed in force: the revoked token kept working, contrary to "a
    token removed stops working". A file put in the tokens file's place with the default umask (0644) was not
    said, as one was at the start."""
    import logging

    from trainmetrics.jobserver import auth

    monkeypatch.setattr(auth, "RELOAD_CHECK_SECONDS", 0)
    caplog.set_level(logging.INFO, logger=auth.__name__)
    path = tmp_path / "tokens"
    path.write_text(f"{ALICE} alice\n")
    path.chmod(0o600)
    tokens = TokenAuth(load_tokens(path), path)
    assert tokens.owner(f"Bearer {ALICE}") == "alice"
    for revoked in (f"# {ALICE} alice  (revoked)\n", ""):
        path.write_text(revoked)
        with pytest.raises(ApiError) as refused:
            tokens.owner(f"Bearer {ALICE}")
        assert refused.value.status == 401
    assert sum("holds no token" in record.getMessage() for record in caplog.records) == 2
    with pytest.raises(ValueError, match="no tokens"):      # at the start, still a mistake said at once
        load_tokens(path)

    replacement = tmp_path / "tokens.new"
    replacement.write_text(f"{BOB} bob\n")
    replacement.chmod(0o644)
    replacement.rename(path)
    assert tokens.owner(f"Bearer {BOB}") == "bob"
    assert [record.getMessage() for record in caplog.records if "other users" in record.getMessage()] == [
        f"--tokens {path}: other users of this machine may read or change it (mode 0644): whoever reads it can act "
        "as any owner; chmod 600 it"]
    path.write_text(f"{BOB} bob\n{ALICE} alice\n")      # still exposed: said once, not at each change
    assert tokens.owner(f"Bearer {ALICE}") == "alice"
    assert sum("other users" in record.getMessage() for record in caplog.records) == 1

    path.write_text(f"{BOB} bob\nnot a tokens line\n")     # a bad line still leaves the tokens as they were
    assert tokens.owner(f"Bearer {ALICE}") == "alice"


def test_a_fifo_a_device_or_a_huge_file_at_the_tokens_path_is_refused_at_once(tmp_path):
    """A FIFO at the path held the server's start (or a request's reload of the file) until something wrote to
    it, /dev/zero was read without end, and a 200 MB file held every request 4 s on each change (found in
    review)."""
    import os
    import threading

    from trainmetrics.jobserver import auth

    fifo, huge = tmp_path / "fifo", tmp_path / "huge"
    os.mkfifo(fifo)
    huge.write_text((f"{ALICE} alice\n" + "# " + "x" * 100 + "\n") * (auth.MAX_TOKENS_FILE_BYTES // 100))
    for path, said in ((fifo, "not a regular file"), ("/dev/zero", "not a regular file"), (huge, "larger than")):
        outcome = []

        def load_it():
            try:
                load_tokens(path)
            except ValueError as error:
                outcome.append(str(error))

        reader = threading.Thread(target=load_it, daemon=True)
        reader.start()
        reader.join(timeout=5)
        assert outcome and said in outcome[0], (path, outcome)
    (tmp_path / "linked").symlink_to(huge)
    huge.write_text(f"{ALICE} alice\n")
    assert load_tokens(tmp_path / "linked") == {ALICE.encode(): "alice"}    # a symlink is followed (secrets are)


def test_owners_whose_names_differ_in_case_alone_are_refused(tmp_path):
    """`alice-run` and `Alice-run`, each owner's own job id, name one directory on a case-insensitive file system:
    one owner's downloads and resumes would read the other's checkpoints. (Two tokens of one owner are fine.)"""
    with pytest.raises(ValueError, match="line 3: owner 'Alice' and owner 'alice' differ in case alone"):
        load(tmp_path, f"{ALICE} alice\n{BOB} alice\nalice-token-other-0123 Alice\n")

"""Listen addresses (trainmetrics.command.parse_listen), as every server's --listen and a job's --metrics-listen
take them."""

import pytest

from trainmetrics.command import parse_listen
from trainmetrics.trainer.distributed import rank_listen


@pytest.mark.parametrize("value, address", [
    ("127.0.0.1:9400", ("127.0.0.1", 9400)), ("0.0.0.0:0", ("0.0.0.0", 0)), (":9400", ("127.0.0.1", 9400)),
    ("9400", ("127.0.0.1", 9400)), ("localhost:80", ("localhost", 80)),
    ("[::1]:9400", ("::1", 9400)), ("[::]:0", ("::", 0)), ("[fe80::1%eth0]:80", ("fe80::1%eth0", 80)),
])
def test_a_listen_address_is_parsed(value, address):
    assert parse_listen(value) == address


@pytest.mark.parametrize("value, said", [
    # `::1` was host ':' and port 1, found only at the bind: "cannot listen on ::1: Name or service not known".
    ("::1", "an IPv6 address goes in brackets: write [::1]:PORT"),
    ("::", "write [::]:PORT"),
    ("fe80::1", "write [fe80::1]:PORT"),
    # `::1:9400` was taken for [::1]:9400, yet it is an IPv6 address of its own: both said.
    ("::1:9400", "write [::1]:9400 (or [::1:9400]:PORT if ::1:9400 is the address)"),
    (":::9400", "write [::]:9400"),
    ("fe80::1%eth0:80", "write [fe80::1%eth0]:80"),
    ("[::1]", "expected [IPV6]:PORT, e.g. [::1]:9400"),
    ("[::1", "expected [IPV6]:PORT"),
    ("[::1]x:80", "expected [IPV6]:PORT"),
    ("[]:80", "expected [IPV6]:PORT"),
    ("[[::1]]:80", "expected [IPV6]:PORT"),
    ("host]:80", "expected HOST:PORT, or [IPV6]:PORT"),       # stripped of its bracket, it was host:80
    ("[::1]:99999", "PORT in 0..65535"),
    ("host:port", "PORT in 0..65535"),
])
def test_a_bad_listen_address_says_what_to_write(value, said):
    with pytest.raises(ValueError, match="invalid listen address") as caught:
        parse_listen(value)
    assert said in str(caught.value)
    assert "\n" not in str(caught.value)


def test_each_rank_of_an_ipv6_address_keeps_its_brackets():
    assert rank_listen("[::1]:9400", 2) == "[::1]:9402"
    assert parse_listen(rank_listen("[::1]:9400", 2)) == ("::1", 9402)

"""The shared HTTP edge (trainmetrics/edge.py): what its /metrics serves."""

import asyncio

import httpx
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Summary, generate_latest

from tests.bcrypt_checks import CountedChecks
from trainmetrics.edge import Component, build_app


async def served_metrics(registry: CollectorRegistry) -> str:
    transport = httpx.ASGITransport(app=build_app([Component(name="test", routes=[], registry=registry)]))
    async with httpx.AsyncClient(transport=transport, base_url="http://edge") as client:
        return (await client.get("/metrics")).text


def test_metrics_serves_no_created_series_and_leaves_the_registry_as_it_was():
    registry = CollectorRegistry()
    Counter("edge_test_requests", "requests", ["route"], registry=registry).labels("/a").inc()
    Histogram("edge_test_duration_seconds", "durations", registry=registry).observe(0.1)
    Summary("edge_test_sizes_bytes", "sizes", registry=registry).observe(3)
    Gauge("edge_test_created", "a gauge whose own name ends in _created", registry=registry).set(5)
    text = asyncio.run(served_metrics(registry))
    assert 'edge_test_requests_total{route="/a"} 1.0' in text
    assert "edge_test_duration_seconds_count 1.0" in text and "edge_test_sizes_bytes_sum 3.0" in text
    assert "edge_test_created 5.0" in text
    assert not [line for line in text.splitlines() if "_created" in line and "edge_test_created" not in line], text
    # Only the edge's answer changes: the registry (and every other one of the process) still has them.
    assert b'edge_test_requests_created{route="/a"}' in generate_latest(registry)


def basic_auth_edge(users: dict[str, str]):
    """An edge with basic auth (bcrypt cost 4) over its /metrics, and a function giving the status of a GET."""
    import base64

    import bcrypt

    from trainmetrics.webconfig import WebConfig

    config = WebConfig(users={user: bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=4))
                              for user, password in users.items()})
    app = build_app([Component(name="test", routes=[], registry=CollectorRegistry())], web_config=config)

    async def status(user: str, password: str, address: str = "127.0.0.1") -> int:
        """(An address that failed a check gets no other for a second: a 503. The tests' next check after a
        refusal comes from another address.)"""
        header = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False, client=(address, 1234))
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
            return (await client.get("/metrics", headers={"Authorization": header})).status_code

    return status


def test_a_password_longer_than_bcrypt_takes_is_a_401_not_a_500():
    """bcrypt 5 raises ValueError past 72 bytes: any client sending a long password got a 500 (and an ERROR
    line with a traceback in the log each time)."""
    status = basic_auth_edge({"prometheus": "right"})
    assert asyncio.run(status("prometheus", "x" * 73)) == 401
    assert asyncio.run(status("prometheus", "right", "127.0.0.2")) == 200


def test_an_unknown_user_costs_the_same_bcrypt_check_as_a_known_one(monkeypatch):
    """An unknown user name was refused at once, a known one after a bcrypt check (0.1-0.3 s): the time of a 401
    told which user names exist."""
    import bcrypt

    status = basic_auth_edge({"prometheus": "right"})
    checks = []
    checkpw = bcrypt.checkpw

    def counted(password: bytes, hashed: bytes) -> bool:
        checks.append(password)
        return checkpw(password, hashed)

    monkeypatch.setattr(bcrypt, "checkpw", counted)
    assert asyncio.run(status("nobody", "right")) == 401
    assert asyncio.run(status("prometheus", "wrong", "127.0.0.2")) == 401
    assert checks == [b"right", b"wrong"]
    # The unknown user's check used a known user's hash, with that user's password: still refused, and its
    # remembered verdict is not that user's.
    assert asyncio.run(status("nobody", "right")) == 401 and asyncio.run(status("prometheus", "right", "::1")) == 200


def test_two_authorization_headers_are_refused_on_every_route():
    """The edge read the last of two, a route that checks its own credentials (the job server's internal one)
    the first: a request could pass one check with one header and the other with another."""
    app = build_app([Component(name="test", routes=[], registry=CollectorRegistry())])

    async def statuses() -> list[int]:
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
            two = [("Authorization", "Bearer one-0123456789abcdef"), ("Authorization", "Bearer two-0123456789abc")]
            return [(await client.get(path, headers=two)).status_code for path in ("/metrics", "/healthz")] + \
                [(await client.get("/metrics", headers=two[:1])).status_code]

    assert asyncio.run(statuses()) == [400, 400, 200]


def test_new_wrong_passwords_are_refused_at_once_and_a_new_right_one_is_let_in_during_their_flood(monkeypatch):
    """The edge queued every header it had not checked behind two bcrypt threads: 40 clients each sending a new
    wrong password kept a new right one waiting seconds (each waiting request holding its connection). Now a
    header is checked only when PasswordChecks admits it, and the rest are a 503 with Retry-After at once; an
    address that failed no check has a slot of its own."""
    import base64
    import secrets
    import time

    import bcrypt

    from trainmetrics.webconfig import WebConfig

    checks = CountedChecks(monkeypatch)
    # 11 rounds: ~0.15-0.3 s a check here (a cost-12 hash is longer): 40 queued took seconds
    config = WebConfig(users={"prometheus": bcrypt.hashpw(b"right", bcrypt.gensalt(rounds=11))})
    app = build_app([Component(name="test", routes=[], registry=CollectorRegistry())], web_config=config)

    def header(password: str) -> dict[str, str]:
        return {"Authorization": "Basic " + base64.b64encode(f"prometheus:{password}".encode()).decode()}

    async def flood_and_ask() -> tuple[list[tuple[int, float]], tuple[int, float]]:
        stop, answers = asyncio.Event(), []

        async def flooder() -> None:
            transport = httpx.ASGITransport(app=app, raise_app_exceptions=False, client=("127.0.0.1", 1234))
            async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
                while not stop.is_set():
                    began = time.monotonic()
                    status = (await client.get("/metrics", headers=header(secrets.token_hex(8)))).status_code
                    answers.append((status, time.monotonic() - began))
                    await asyncio.sleep(0.05)

        flooders = [asyncio.create_task(flooder()) for _ in range(40)]
        await asyncio.sleep(0.5)
        began = time.monotonic()
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False, client=("127.0.0.250", 1234))
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
            while True:        # as a client asks again after Retry-After (sooner here)
                status = (await client.get("/metrics", headers=header("right"))).status_code
                if status != 503 or time.monotonic() - began > 5:
                    break
                await asyncio.sleep(0.1)
        right = (status, time.monotonic() - began)
        stop.set()
        await asyncio.gather(*flooders)
        return answers, right

    answers, right = asyncio.run(flood_and_ask())
    print(f"the right password: {right}; the flood: {len(answers)} answers, {checks.most} checks at once")
    assert right[0] == 200 and right[1] < 2.0, right        # before: ~3-6 s behind the queue
    assert checks.most <= 2
    assert {status for status, _ in answers} <= {401, 503}
    refused_at_once = [took for status, took in answers if status == 503]
    assert refused_at_once and max(refused_at_once) < 1.0, max(refused_at_once)


def test_a_password_check_does_not_wait_behind_other_work_in_the_thread_pool():
    """The checks ran in the event loop's shared thread pool: with its threads busy (slow routes' work), an admitted
    check waited behind them holding its slot, and every other new password was a 503 meanwhile. They have
    threads of their own."""
    import time

    import anyio

    status = basic_auth_edge({"prometheus": "right"})

    async def scenario() -> tuple[int, float]:
        anyio.to_thread.current_default_thread_limiter().total_tokens = 1      # the pool, all busy
        busy = asyncio.ensure_future(anyio.to_thread.run_sync(time.sleep, 3.0))
        await asyncio.sleep(0.2)
        began = time.monotonic()
        answer = await status("prometheus", "right")
        took = time.monotonic() - began
        await busy
        return answer, took

    answer, took = asyncio.run(scenario())
    assert answer == 200 and took < 2.0, (answer, took)        # before: after the 3 s of the busy thread


def test_a_clients_parallel_first_requests_wait_for_one_check_of_their_password(monkeypatch):
    """Ten requests at once with a password not checked yet: one check ran, and the others were 503s (a second
    slot is kept for new addresses only). Those whose header is under a check now wait for its verdict."""
    checks = CountedChecks(monkeypatch)
    status = basic_auth_edge({"prometheus": "right"})

    async def burst(password: str) -> list[int]:
        return list(await asyncio.gather(*(status("prometheus", password) for _ in range(10))))

    assert asyncio.run(burst("right")) == [200] * 10
    assert asyncio.run(burst("wrong")) == [401] * 10
    assert checks.total == 2

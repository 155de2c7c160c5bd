"""``meshkit mq broker`` and ``meshkit mq replay`` as a user runs them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from click.testing import CliRunner
from kafka_broker import KafkaBroker, fresh

from meshkit.cli import cli
from meshkit.mq import headers as H
from meshkit.mq.broker import free_port, port_open

ROOT = Path(__file__).resolve().parents[2]


def test_broker_command_serves_until_sigterm() -> None:
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "meshkit", "mq", "broker", "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    try:
        assert proc.stdout is not None
        lines = []  # tansu's own banner comes first, then ours
        while len(lines) < 20 and not (lines and "MESHKIT_MQ=" in lines[-1]):
            lines.append(proc.stdout.readline())
        text = "".join(lines)
        assert f"tansu broker listening on 127.0.0.1:{port}" in text, text
        assert f"export MESHKIT_MQ=kafka://127.0.0.1:{port}" in text, text
        assert port_open("127.0.0.1", port)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=20)
        assert proc.returncode == 0, out
        assert "broker stopped" in out
        deadline = time.monotonic() + 10
        while port_open("127.0.0.1", port) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not port_open("127.0.0.1", port), "the broker outlived the command"
    finally:
        if proc.poll() is None:
            proc.kill()


def test_broker_goes_when_the_command_is_killed() -> None:
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "meshkit", "mq", "broker", "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    try:
        deadline = time.monotonic() + 20
        while not port_open("127.0.0.1", port) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert port_open("127.0.0.1", port)
        proc.kill()  # SIGKILL: no chance to stop the broker itself
        proc.wait(10)
        deadline = time.monotonic() + 10
        while port_open("127.0.0.1", port) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not port_open("127.0.0.1", port), "the broker outlived a killed command"
    finally:
        if proc.poll() is None:
            proc.kill()


def test_broker_command_on_a_busy_port_fails_clearly(broker: KafkaBroker) -> None:
    result = CliRunner().invoke(cli, ["mq", "broker", "--port", str(broker.port)])
    assert result.exit_code == 1
    assert f"expected {broker.bootstrap} to be free" in result.output


def test_replay_command(broker: KafkaBroker) -> None:
    topic = fresh("orders")
    broker.create_topic(topic, 1)
    dlq = broker.create_topic(f"{topic}.dlq", 2)
    other = broker.create_topic(fresh("elsewhere"), 1)
    failed = [
        (H.ORIGINAL_TOPIC, topic.encode()),
        (H.ERROR, b"boom"),
        (H.ATTEMPTS, b"3"),
        (H.DEAD_LETTER_REASON, b"exhausted"),
        ("user", b"kept"),
    ]
    broker.produce(dlq, [(f"k{i}".encode(), f"v{i}".encode(), failed) for i in range(4)])
    runner = CliRunner()

    dry = runner.invoke(cli, ["mq", "replay", topic, "--url", broker.url, "--dry-run"])
    assert dry.exit_code == 0, dry.output
    assert f"would replay 4 message(s) from {dlq}: 4 to {topic}" in dry.output
    assert broker.read_all(topic, idle=0.3) == []

    one = runner.invoke(cli, ["mq", "replay", topic, "--url", broker.url, "--limit", "1"])
    assert one.exit_code == 0, one.output
    assert f"replayed 1 message(s) from {dlq}: 1 to {topic}" in one.output
    rest = runner.invoke(cli, ["mq", "replay", topic, "--url", broker.url])
    assert rest.exit_code == 0, rest.output
    assert f"replayed 3 message(s) from {dlq}: 3 to {topic}" in rest.output
    back = broker.read_all(topic)
    assert sorted(m.key() for m in back) == [b"k0", b"k1", b"k2", b"k3"]
    for msg in back:
        h = H.header_map(msg.headers())
        assert h["user"] == "kept" and h[H.ORIGINAL_TOPIC] == topic and H.REPLAYED_AT in h
        assert H.ERROR not in h and H.ATTEMPTS not in h and H.DEAD_LETTER_REASON not in h

    nothing = runner.invoke(cli, ["mq", "replay", topic, "--url", broker.url])
    assert nothing.exit_code == 0 and "replayed 0 message(s)" in nothing.output

    # --to sends them elsewhere; the replay group is per DLQ, so start from a fresh DLQ.
    dlq2 = broker.create_topic(fresh("manual-dlq"), 1)
    broker.produce(dlq2, [(b"x", b"y", failed)])
    moved = runner.invoke(
        cli, ["mq", "replay", topic, "--url", broker.url, "--dlq", dlq2, "--to", other]
    )
    assert moved.exit_code == 0, moved.output
    assert [m.value() for m in broker.read_all(other)] == [b"y"]


def test_replay_command_errors(broker: KafkaBroker, monkeypatch: object) -> None:
    runner = CliRunner()
    missing = runner.invoke(cli, ["mq", "replay", fresh("none"), "--url", broker.url])
    assert missing.exit_code == 1
    assert "expected a dead-letter topic" in missing.output
    bad = runner.invoke(cli, ["mq", "replay", "t", "--url", "http://x"])
    assert bad.exit_code == 2 and "kafka://host:port" in bad.output

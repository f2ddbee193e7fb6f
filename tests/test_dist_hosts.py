"""Two hosts: two network namespaces joined by a veth pair, one torchrun node in each (c10d rendezvous
over the veth addresses, gloo between them): GRPO's 3 steps match the one-process run.

Traffic stays between the two namespaces this test creates (10.231.0.1 ↔ 10.231.0.2); they are
deleted afterwards whatever happens. Skipped where `ip netns` is not permitted (needs root).
"""
import os
import shutil
import subprocess
import sys

import pytest
from test_dist import ROOT, WORKER, assert_same_grpo, env, grpo_reference, grpo_toml
from test_dist import grpo_base, sft_data  # noqa: F401  (the fixtures this test uses)

ADDR = ("10.231.0.1", "10.231.0.2")
PORT = 29731


def ip(*args, ns: str | None = None) -> subprocess.CompletedProcess:
    cmd = (["ip", "netns", "exec", ns] if ns else []) + ["ip", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=20)


@pytest.fixture
def two_hosts():
    """→ [(namespace, address, interface)] for two namespaces joined by a veth pair."""
    if shutil.which("ip") is None:
        pytest.skip("no `ip` command (iproute2) to create network namespaces")
    tag = f"{os.getpid() % 100000}"
    hosts = [(f"r1k{tag}a", ADDR[0], f"r1k{tag}a0"), (f"r1k{tag}b", ADDR[1], f"r1k{tag}b0")]
    made = []
    try:
        for ns, _, _ in hosts:
            r = ip("netns", "add", ns)
            if r.returncode != 0:
                pytest.skip(f"`ip netns add` not permitted here: {r.stderr.strip()}")
            made.append(ns)
        (na, aa, ia), (nb, ab, ib) = hosts
        steps = [ip("link", "add", ia, "type", "veth", "peer", "name", ib),
                 ip("link", "set", ia, "netns", na), ip("link", "set", ib, "netns", nb)]
        for ns, addr, dev in hosts:
            steps += [ip("addr", "add", f"{addr}/24", "dev", dev, ns=ns), ip("link", "set", dev, "up", ns=ns),
                      ip("link", "set", "lo", "up", ns=ns)]
        bad = [r for r in steps if r.returncode != 0]
        if bad:
            pytest.skip(f"could not wire the veth pair: {bad[0].stderr.strip()}")
        yield hosts
    finally:
        for ns in made:  # deleting a namespace deletes its end of the veth pair, and so the pair
            ip("netns", "del", ns)


def test_grpo_on_two_hosts_matches_one_process(two_hosts, grpo_base, tmp_path, monkeypatch):  # noqa: F811
    one = grpo_reference(tmp_path, grpo_base, monkeypatch)
    cfg = grpo_toml(tmp_path / "g.toml", grpo_base, parallel="ddp")
    procs = []
    try:
        for node, (ns, addr, dev) in enumerate(two_hosts):
            cmd = ["ip", "netns", "exec", ns, sys.executable, "-m", "torch.distributed.run", "--nnodes=2",
                   f"--node-rank={node}", "--nproc-per-node=1", "--rdzv-backend=c10d", "--rdzv-id=r1kit-hosts",
                   f"--rdzv-endpoint={ADDR[0]}:{PORT}", f"--local-addr={addr}",
                   # node 0 hosts the rendezvous store (its address is not the machine's hostname here)
                   f"--rdzv-conf=timeout=60,is_host={'true' if node == 0 else 'false'}",
                   WORKER, "grpo", "--config", str(cfg), "--out", str(tmp_path / "two")]
            procs.append(subprocess.Popen(cmd, env=env(R1KIT_TEST_REWARD="length", GLOO_SOCKET_IFNAME=dev),
                                          cwd=ROOT, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE))
        outs = [p.communicate(timeout=240) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=30)
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    assert_same_grpo(tmp_path / "two", one)

"""REDIS_CLUSTER on the local Redis Cluster (`tests.redis_cluster`): the settings choose cluster
clients, /readyz reports the cluster, and the pages' rate limits (django-ratelimit on Django's
cache) count exactly whichever node holds their counters."""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator

import pytest
import redis
from django.core.cache import caches
from django.test import AsyncClient, RequestFactory, override_settings
from django_ratelimit.core import is_ratelimited
from redis.backoff import NoBackoff
from redis.retry import Retry

from llmgateway.cache import MSG_UNREACHABLE, ResilientRedisCache
from tests.conftest import ROOT, free_port
from tests.redis_cluster import cluster_client, delete_prefixed, primary_urls, require_cluster

SINGLE_REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/15")


@pytest.fixture
def cluster_url() -> str:
    return require_cluster()


@pytest.fixture
def cache_prefix(cluster_url: str) -> Iterator[str]:
    """Django's cache on the cluster, under a KEY_PREFIX of this test's; its keys deleted after."""
    prefix = f"test-cache-{uuid.uuid4().hex[:12]}"
    cache = {
        "BACKEND": "llmgateway.cache.ResilientRedisCache",
        "LOCATION": cluster_url,
        "KEY_PREFIX": prefix,
        "OPTIONS": {"socket_connect_timeout": 0.5, "socket_timeout": 0.5, "cluster": True},
    }
    with override_settings(CACHES={"default": cache}, RATELIMIT_USE_CACHE="default"):
        yield prefix
    delete_prefixed(cluster_client(cluster_url), f"{prefix}:")


def test_the_cluster_setting_selects_cluster_clients_and_the_pubsub_layer(cluster_url: str) -> None:
    code = (
        "import json, llmgateway.settings as s; "
        "print(json.dumps([s.REDIS_CLUSTER, s.CHANNEL_LAYERS['default']['BACKEND'], "
        "s.CACHES['default']['OPTIONS']['cluster']]))"
    )
    env = {**os.environ, "REDIS_URL": cluster_url, "REDIS_CLUSTER": "true"}
    result = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, check=True)
    assert json.loads(result.stdout) == [True, "channels_redis.pubsub.RedisPubSubChannelLayer", True]

    env["REDIS_URL"] = SINGLE_REDIS_URL  # a database other than 0: refused at start, not per request
    refused = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True)
    assert refused.returncode != 0
    assert "ImproperlyConfigured: REDIS_CLUSTER: a Redis Cluster has only database 0" in refused.stderr


@pytest.mark.django_db(transaction=True)
async def test_readyz_checks_every_node_of_the_cluster(settings, cluster_url: str) -> None:
    settings.REDIS_URL, settings.REDIS_CLUSTER = cluster_url, True
    body = json.loads((await AsyncClient().get("/readyz")).content)
    assert (body["status"], body["redis"]) == ("ok", "ok")


def _cluster_port() -> int:
    """A free port whose cluster bus port (+10000) is free too, and exists."""
    while True:
        port = random.randrange(20_000, 55_000)
        try:
            with socket.socket() as one, socket.socket() as bus:
                one.bind(("127.0.0.1", port))
                bus.bind(("127.0.0.1", port + 10_000))
            return port
        except OSError:
            continue


@pytest.fixture
def lone_cluster_node(tmp_path) -> Iterator[str]:
    """A cluster-enabled redis-server that is part of no cluster: it serves no slot."""
    port = _cluster_port()
    node = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--cluster-enabled", "yes",
         "--cluster-config-file", str(tmp_path / "nodes.conf"), "--dir", str(tmp_path),
         "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
    )
    client = redis.Redis(port=port, socket_timeout=0.2, retry=Retry(NoBackoff(), 0))
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                assert client.execute_command("CLUSTER INFO")["cluster_state"] == "fail"
                break
            except redis.ConnectionError:
                assert time.monotonic() < deadline and node.poll() is None, "the lone node did not start"
                time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        client.close()
        node.kill()
        node.wait()


@pytest.mark.django_db(transaction=True)
async def test_readyz_says_unavailable_when_the_cluster_cannot_serve(settings, lone_cluster_node: str) -> None:
    """A Redis that is no cluster, and a cluster node that serves no slot (cluster_state:fail),
    are both unavailable, though each answers PING; so is a URL a cluster cannot take."""
    settings.REDIS_CLUSTER = True
    states = []
    single_db0 = SINGLE_REDIS_URL.rsplit("/", 1)[0] + "/0"  # only read: PING, CLUSTER SLOTS
    for url in (single_db0, lone_cluster_node, SINGLE_REDIS_URL):
        settings.REDIS_URL = url
        body = json.loads((await AsyncClient().get("/readyz")).content)
        states.append((body["status"], body["redis"]))
    assert states == [("degraded", "unavailable")] * 3


def test_page_rate_limits_count_exactly_on_every_node(cluster_url: str, cache_prefix: str) -> None:
    """Login attempts from 24 addresses, whose counters land on all three masters: each gets
    exactly its 5; failing closed, a count the cache could not keep would show as a refusal."""
    addresses = [f"203.0.113.{n}" for n in range(1, 25)]
    with override_settings(RATELIMIT_FAIL_OPEN=False):
        limited = {
            address: [
                is_ratelimited(
                    RequestFactory().post("/accounts/login/", REMOTE_ADDR=address),
                    group="login", key="ip", rate="5/h", method="POST", increment=True,
                )
                for _ in range(7)
            ]
            for address in addresses
        }
    assert limited == {address: [False] * 5 + [True] * 2 for address in addresses}
    client = cluster_client(cluster_url)
    counters = list(client.scan_iter(match=f"{cache_prefix}:*", count=1000))
    assert len(counters) == len(addresses)
    assert {client.get_node_from_key(key).name for key in counters} == {
        url.removeprefix("redis://").removesuffix("/0") for url in primary_urls(cluster_url)
    }


def test_the_cache_reads_and_writes_many_keys_across_nodes(cache_prefix: str) -> None:
    cache = caches["default"]
    values = {f"k{n}": n for n in range(12)}  # on several nodes
    assert cache.set_many(values, 60) == []
    assert cache.get_many([*values, "missing"]) == values
    assert cache.incr("k3", 10) == 13
    cache.delete_many(list(values))
    assert cache.get_many(list(values)) == {}


def test_an_unreachable_cluster_reads_as_a_miss() -> None:
    dead = ResilientRedisCache(
        f"redis://127.0.0.1:{free_port()}/0",
        {"OPTIONS": {"socket_connect_timeout": 0.5, "socket_timeout": 0.5, "cluster": True}},
    )
    assert dead.get("k", "default") == "default"
    assert dead.add("k", 1, 60) is False
    with pytest.raises(ValueError, match=MSG_UNREACHABLE):
        dead.incr("k")

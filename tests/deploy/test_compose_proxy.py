"""docker.proxy (filled from the inventory's vilms_proxy): engines that download get the proxy, the gateway never."""

from __future__ import annotations

import copy

import pytest
import yaml

from tests.deploy.test_render import DGPU, SEED, render_dir
from vilms.config.load import build_config

PROXY = {"http": "http://proxy.site:3128", "https": "http://proxy.site:3128", "no-proxy": [".corp.example", "10.0.0.0/8"]}


def compose_of(tmp_path, data, *extra):
    out, result = render_dir(tmp_path, data, *extra)
    assert result.returncode == 0, result.stderr
    return yaml.safe_load((out / "docker-compose.yaml").read_text())


@pytest.mark.parametrize("base, gpu", [(DGPU, "yes"), (SEED, "no")])
def test_engines_get_the_proxy_and_bypass_the_stack_the_gateway_does_not(tmp_path, base, gpu):
    data = copy.deepcopy(base)
    data["docker"] = {**data.get("docker", {}), "proxy": PROXY}
    services = compose_of(tmp_path, data, "--gpu", gpu)["services"]
    engines = [name for name in services if name != "gateway"]
    assert engines
    for name in engines:
        env = services[name]["environment"]
        assert env["HTTPS_PROXY"] == env["https_proxy"] == "http://proxy.site:3128"
        bypass = env["NO_PROXY"].split(",")
        assert bypass[:2] == [".corp.example", "10.0.0.0/8"] and "127.0.0.1" in bypass
        assert set(services) <= set(bypass)  # every service of the stack, the gateway included, is reached directly
    assert not {k for k in services["gateway"]["environment"] if "proxy" in k.lower()}


def test_without_a_proxy_nothing_is_added(tmp_path):
    services = compose_of(tmp_path, DGPU, "--gpu", "yes")["services"]
    assert not {k for s in services.values() for k in s.get("environment", {}) if "proxy" in k.lower()}


def test_a_proxy_that_is_not_a_url_is_refused_with_its_pointer():
    data = copy.deepcopy(DGPU)
    data["docker"]["proxy"] = {"https": "proxy.site:3128"}
    with pytest.raises(Exception) as info:
        build_config(data)
    assert "/docker/proxy/https" in str(info.value)

from __future__ import annotations

import pytest

from lepton.common.config import AgentConfig, load_config, parse_labels
from lepton.common.errors import InvalidArgument


def test_layering_defaults_file_env_flags(tmp_path):
    f = tmp_path / "agent.toml"
    f.write_text('listen = "127.0.0.1:1000"\nname = "from-file"\nheartbeat_interval_s = 2.0\ndown_after_s = 9\n')
    env = {"LEPTON_NAME": "from-env", "LEPTON_HEARTBEAT_INTERVAL_S": "0.5", "LEPTON_DATA_DIR": str(tmp_path)}
    cfg = load_config({"name": "from-flag", "listen": None}, env=env, config_file=str(f))
    assert cfg.name == "from-flag"  # flag beats env and file
    assert cfg.heartbeat_interval_s == 0.5  # env beats file
    assert cfg.listen == "127.0.0.1:1000"  # file beats default
    assert cfg.down_after_s == 9.0
    assert cfg.suspect_after_s == 2.0  # default


def test_defaults_coexist_on_one_host():
    cfg = AgentConfig()
    assert cfg.metrics_listen == ""  # no fixed metrics port: 9100 is node_exporter's
    assert cfg.shard_reserve_bytes == 2 << 30  # room kept free for the Raft log
    assert load_config({"shard_reserve_bytes": "10GiB"}, env={}).shard_reserve_bytes == 10 << 30
    assert load_config({}, env={"LEPTON_SHARD_RESERVE_BYTES": "0"}).shard_reserve_bytes == 0


def test_lists_and_labels_parse():
    cfg = AgentConfig(peers="a:1, b:2,c:3", labels="zone=a, gpu=h100")
    assert cfg.peers == ["a:1", "b:2", "c:3"]
    assert cfg.labels == {"zone": "a", "gpu": "h100"}
    assert not cfg.dev_mode


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"listen": "nope"}, "listen"),
        ({"peers": "a:1,b:2"}, "use 1, 3 or 5"),
        ({"heartbeat_interval_s": 0}, "heartbeat_interval_s"),
        ({"suspect_after_s": 5, "down_after_s": 3}, "suspect_after_s"),
        ({"max_heartbeats_per_s": 0}, "max_heartbeats_per_s"),
        ({"max_heartbeats_per_s": float("inf")}, "max_heartbeats_per_s"),
        ({"labels": "novalue"}, "key=value"),
        ({"fake_gpus": 100}, "fake_gpus"),
        ({"log_level": "chatty"}, "log_level"),
        ({"metrics_listen": "9100"}, "metrics_listen"),
        ({"task_log_max_bytes": "lots"}, "task_log_max_bytes"),
        ({"task_log_max_bytes": -1}, "task_log_max_bytes"),
        ({"task_log_max_bytes": 100}, "task_log_max_bytes"),
        ({"task_retention_s": -1}, "task_retention_s"),
        ({"task_retention_s": float("nan")}, "task_retention_s"),
        ({"shard_reserve_bytes": "-1GiB"}, "shard_reserve_bytes"),
        ({"shard_reserve_bytes": "plenty"}, "shard_reserve_bytes"),
    ],
)
def test_bad_values_are_rejected_with_the_field_named(kwargs, fragment):
    with pytest.raises(InvalidArgument, match=fragment):
        AgentConfig(**kwargs)


def test_bad_file_and_env_values(tmp_path):
    f = tmp_path / "bad.toml"
    f.write_text("no_such_setting = 1\n")
    with pytest.raises(InvalidArgument, match="unknown setting"):
        load_config({}, env={}, config_file=str(f))
    with pytest.raises(InvalidArgument, match="not a number"):
        load_config({}, env={"LEPTON_HEARTBEAT_INTERVAL_S": "fast"})
    with pytest.raises(InvalidArgument, match="cannot read"):
        load_config({}, env={}, config_file=str(tmp_path / "missing.toml"))


def test_parse_labels_mapping_passthrough():
    assert parse_labels({"a": 1}) == {"a": "1"}


def test_task_disk_settings_take_sizes_from_every_layer(tmp_path):
    from lepton.agent.main import build_parser

    defaults = AgentConfig()
    assert (defaults.task_log_max_bytes, defaults.task_retention_s) == (256 << 20, 86400.0)
    f = tmp_path / "agent.toml"
    f.write_text('task_log_max_bytes = "1GiB"\ntask_retention_s = 60\n')
    assert load_config(env={}, config_file=str(f)).task_log_max_bytes == 1 << 30
    env = {"LEPTON_TASK_LOG_MAX_BYTES": "64KiB", "LEPTON_TASK_RETENTION_S": "0"}
    cfg = load_config(env=env, config_file=str(f))
    assert (cfg.task_log_max_bytes, cfg.task_retention_s) == (64 << 10, 0.0)
    flags = vars(build_parser().parse_args(["--task-log-max-bytes", "0", "--task-retention", "3600"]))
    cfg = load_config(flags, env=env)
    assert (cfg.task_log_max_bytes, cfg.task_retention_s) == (0, 3600.0)
    assert AgentConfig(task_log_max_bytes=8192).task_log_max_bytes == 8192


def test_task_user_defaults_to_nobody_for_root_and_none_opts_out(monkeypatch):
    import lepton.common.config as config

    monkeypatch.setattr(config.os, "geteuid", lambda: 0)
    assert load_config({}, env={}).task_user == "nobody"
    assert load_config({}, env={"LEPTON_TASK_USER": "none"}).task_user == ""  # env "" is unset: "none" says it
    assert load_config({"task_user": ""}, env={"LEPTON_TASK_USER": "svc"}).task_user == ""  # --task-user ''
    assert load_config({"task_user": "svc"}, env={}).task_user == "svc"
    monkeypatch.setattr(config.os, "geteuid", lambda: 1000)
    assert load_config({}, env={}).task_user == ""  # not root: tasks run as the agent's user

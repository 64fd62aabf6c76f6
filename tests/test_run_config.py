"""The typed run configuration: one field per flag, argparse and YAML generated from it, checks at
construction, nothing mutable afterwards."""

from __future__ import annotations

import dataclasses

import pytest

from megatron.training.config import SECTIONS, RunConfig, build_parser, parse_config

BASE = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "32",
        "--train-iters", "10", "--lr", "1e-3"]


def test_every_flag_is_one_field_of_one_section():
    names = [f.name for section in SECTIONS.values() for f in dataclasses.fields(section)]
    assert len(names) == len(set(names)), "a flag defined in two sections"
    parser_dests = {a.dest for a in build_parser()._actions} - {"help", "config"}
    assert parser_dests == set(names)  # the parser is generated from the sections, nothing else
    config = parse_config(BASE)
    assert set(config.flat()) == set(names)
    assert config.flat()["num_layers"] == config.model.num_layers == config.num_layers == 2


def test_types_defaults_and_switches_come_from_the_fields():
    config = parse_config(BASE + ["--fp8-level", "O3", "--no-fp8-wgrad-auto-scaling", "--fp8-reduce-scatter",
                                  "--data-path", "0.5", "A", "0.5", "B", "--swiglu"])
    assert config.precision.fp8_level == "O3" and config.precision.fp8_wgrad_auto_scaling is False
    assert config.precision.fp8_reduce_scatter is True and config.precision.fp8_pipeline_p2p is None
    assert config.data.data_path == ["0.5", "A", "0.5", "B"] and config.model.swiglu
    assert isinstance(config.schedule.lr, float) and config.training.micro_batch_size == 1
    with pytest.raises(ValueError, match="invalid choice"):
        parse_config(BASE + ["--fp8-level", "O4"])


def test_yaml_supplies_defaults_that_flags_override(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("num-layers: 3\nhidden_size: 64\nnum_attention_heads: 4\nseq_length: 32\ntrain_iters: 5\n"
                    "lr: 3e-4\nfp8_level: O1\n")  # PyYAML reads 3e-4 as a string: argparse converts it
    config = parse_config(["--config", str(path), "--num-layers", "4"])
    assert (config.model.num_layers, config.schedule.lr, config.precision.fp8_level) == (4, 3e-4, "O1")
    path.write_text("num_layers: 3\nnum_layrs: 4\n")
    with pytest.raises(ValueError, match="unknown key 'num_layrs'"):
        parse_config(["--config", str(path)])


def test_nothing_changes_a_config_after_it_is_built():
    config = parse_config(BASE)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.model.num_layers = 3
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.training = None
    sized = config.for_world(4)
    assert sized.training.global_batch_size == 4 and config.training.global_batch_size is None
    assert sized is not config and sized.model is config.model


def test_defaults_that_follow_other_flags_are_resolved_once():
    config = parse_config(BASE)
    assert config.model.max_position_embeddings == 32  # from --seq-length
    assert config.model.query_groups == 4  # one per head
    assert parse_config(BASE + ["--group-query-attention"]).model.query_groups == 1
    assert parse_config(BASE + ["--group-query-attention", "--num-query-groups", "2"]).model.query_groups == 2


@pytest.mark.parametrize("extra, message", [
    (["--num-query-groups", "2"], "takes effect only with --group-query-attention"),
    (["--override-opt-param-scheduler", "--use-checkpoint-opt-param-scheduler"], "contradict each other"),
    (["--loss-plot", "x.png"], "--loss-plot needs --metrics-file"),
    (["--save-interval", "5"], "--save-interval needs --save"),
    (["--max-position-embeddings", "16"], "exceeds --max-position-embeddings"),
    (["--tensor-model-parallel-size", "3"], "must be divisible by --tensor-model-parallel-size"),
    (["--fp8-level", "O3", "--main-params-dtype", "fp32"], "O3"),
    (["--fp8-reduce-scatter", "--fp8-level", "O2"], "O3"),
    (["--adam-beta2", "1.5"], "--adam-beta2"),
    (["--micro-batch-size", "0"], "--micro-batch-size must be >= 1"),
    (["--malloc-mmap-threshold-mb", "-1"], "--malloc-mmap-threshold-mb must be >= 0"),
])
def test_contradictions_are_errors_naming_the_flags(extra, message):
    with pytest.raises(ValueError, match=message):
        parse_config(BASE + extra)


def test_required_flags_and_world_size_checks():
    with pytest.raises(ValueError, match="missing --num-layers"):
        parse_config(BASE[2:])
    config = parse_config(BASE + ["--tensor-model-parallel-size", "2", "--global-batch-size", "6"])
    with pytest.raises(ValueError, match="world size 3 is not divisible"):
        config.for_world(3)
    with pytest.raises(ValueError, match="--global-batch-size \\(6\\) must be a multiple"):
        config.for_world(8)
    assert config.for_world(6).training.global_batch_size == 6


def test_entry_points_add_sections():
    @dataclasses.dataclass(frozen=True)
    class DemoArgs(__import__("megatron.training.flags", fromlist=["Section"]).Section):
        title = "demo"
        demo_epochs: int = dataclasses.field(default=1, metadata={"help": "epochs"})

    config = parse_config(BASE + ["--demo-epochs", "3"], extra_sections={"demo": DemoArgs})
    assert isinstance(config, RunConfig) and config.extra["demo"].demo_epochs == 3 and config.demo_epochs == 3
    assert config.flat()["demo_epochs"] == 3


def test_cpu_runs_fix_the_allocators_threshold_unless_told_otherwise(monkeypatch):
    from megatron.training import host_memory

    calls = []
    monkeypatch.setattr(host_memory, "set_mmap_threshold", lambda nbytes: calls.append(nbytes) or True)
    monkeypatch.delenv(host_memory.ENV_VAR, raising=False)
    assert parse_config(BASE).training.malloc_mmap_threshold_mb == 4
    assert host_memory.configure_host_allocator(4) == "glibc mmap threshold fixed at 4 MiB"
    assert host_memory.configure_host_allocator(0.5) == "glibc mmap threshold fixed at 0.5 MiB"
    assert calls == [4 << 20, 1 << 19]
    assert "adaptive" in host_memory.configure_host_allocator(0)
    monkeypatch.setenv(host_memory.ENV_VAR, "65536")
    assert "MALLOC_MMAP_THRESHOLD_=65536" in host_memory.configure_host_allocator(4)
    assert calls == [4 << 20, 1 << 19]  # the environment's setting stands

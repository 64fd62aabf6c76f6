"""The typed run configuration: one field per flag, argparse and YAML generated from it, checks at
construction, nothing mutable afterwards."""

from __future__ import annotations

import dataclasses

import pytest
import torch

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


def test_fp8_format_alone_turns_on_fp8_gemms_as_upstream(tmp_path):
    assert parse_config(BASE).precision.fp8_level == "none"
    config = parse_config(BASE + ["--fp8-format", "hybrid"])
    assert (config.precision.fp8_level, config.precision.fp8_format) == ("O0", "hybrid")
    assert config.precision.fp8_config().level == "O0" and config.for_world(1).precision.fp8_level == "O0"
    assert config.flat()["fp8_level"] == "O0"  # what checkpoints record
    assert parse_config(BASE + ["--fp8-format", "e4m3", "--fp8-level", "none"]).precision.fp8_level == "none"
    assert parse_config(BASE + ["--fp8-format", "e4m3", "--fp8-level", "O3"]).precision.fp8_level == "O3"
    path = tmp_path / "run.yaml"
    path.write_text("fp8_format: e4m3\n")  # a config file that names the format explicitly
    from_file = parse_config(["--config", str(path)] + BASE)
    assert (from_file.precision.fp8_level, from_file.precision.fp8_format) == ("O0", "e4m3")
    path.write_text("fp8_format: hybrid\nfp8_level: O2\n")
    assert parse_config(["--config", str(path)] + BASE).precision.fp8_level == "O2"


def test_fp16_is_fp16_parameters_with_a_loss_scale():
    precision = parse_config(BASE + ["--fp16"]).precision
    assert precision.params_dtype == torch.float16
    scaler = precision.loss_scaler_config()
    assert (scaler.dynamic, scaler.initial_scale, scaler.min_scale, scaler.growth_interval, scaler.hysteresis) == (
        True, 2.0 ** 32, 1.0, 1000, 2)  # Megatron-LM's defaults
    custom = parse_config(BASE + ["--fp16", "--initial-loss-scale", "65536", "--min-loss-scale", "16",
                                  "--loss-scale-window", "50", "--hysteresis", "1"]).precision.loss_scaler_config()
    assert (custom.initial_scale, custom.min_scale, custom.growth_interval, custom.hysteresis) == (65536, 16, 50, 1)
    constant = parse_config(BASE + ["--fp16", "--loss-scale", "1024"]).precision.loss_scaler_config()
    assert not constant.dynamic and constant.constant_scale == 1024
    assert parse_config(BASE + ["--bf16"]).precision.loss_scaler_config() is None
    assert parse_config(BASE + ["--fp16", "--fp8-level", "O0"]).precision.params_dtype == torch.float16


@pytest.mark.parametrize("extra, message", [
    (["--fp16", "--bf16"], "--fp16 and --bf16 contradict each other"),
    (["--fp16", "--fp8-level", "O1"], "--fp16 with --fp8-level O1 is not supported"),
    (["--initial-loss-scale", "1024"], "--initial-loss-scale sets dynamic loss scaling, which --fp16 turns on"),
    (["--bf16", "--hysteresis", "1"], "--hysteresis sets dynamic loss scaling"),
    (["--fp16", "--loss-scale", "0.5"], "--loss-scale must be a finite number >= 1"),
    (["--fp16", "--min-loss-scale", "8", "--initial-loss-scale", "4"], r"--min-loss-scale \(8\) must not exceed"),
    (["--train-samples", "100"], "--train-iters and --train-samples both given"),
    (["--lr-decay-samples", "100"], "--lr-decay-samples does not go with iteration-based training"),
    (["--lr-warmup-samples", "10"], "--lr-warmup-samples does not go with iteration-based training"),
    (["--lr-wsd-decay-samples", "10"], "--lr-wsd-decay-samples does not go with iteration-based training"),
    (["--rampup-batch-size", "4", "4"], "--rampup-batch-size: expected 3 arguments"),
    (["--attention-backend", "sdpa"], "invalid choice: 'sdpa'"),
])
def test_precision_and_schedule_mistakes_are_one_line(extra, message):
    with pytest.raises(ValueError, match=message):
        parse_config(BASE + extra)


SAMPLES = [a for a in BASE if a not in ("--train-iters", "10")]


@pytest.mark.parametrize("extra, message", [
    (["--lr-decay-iters", "5"], "--lr-decay-iters does not go with sample-based training \\(--train-samples\\); "
                                "use --lr-decay-samples"),
    (["--lr-warmup-iters", "5"], "use --lr-warmup-samples"),
    (["--lr-warmup-fraction", "0.1", "--lr-warmup-samples", "5"], "--lr-warmup-fraction and --lr-warmup-samples"),
])
def test_sample_based_runs_refuse_iteration_flags(extra, message):
    with pytest.raises(ValueError, match=message):
        parse_config(SAMPLES + ["--train-samples", "1000"] + extra)


def test_iterations_from_samples_and_the_batch_ramp():
    config = parse_config(SAMPLES + ["--train-samples", "1000", "--global-batch-size", "16"])
    assert config.train_iters == 62 and config.training.train_iters is None  # 1000 // 16, the partial batch dropped
    assert config.lr_schedule_config().unit == "samples" and config.lr_schedule_config().total_decay_iters == 1000
    # Ramp 4 -> 16 by 4 over 24 samples (8 samples a step): batches 4, 4, 8, 12, then 16 from 28 samples on;
    # Megatron-LM counts the ramp's 4 iterations and (100 - 28) // 16 = 4 more.
    ramped = parse_config(SAMPLES + ["--train-samples", "100", "--global-batch-size", "16", "--rampup-batch-size", "4",
                                     "4", "24"]).for_world(1)
    assert ramped.train_iters == 8 and ramped.batch_schedule.samples_for(8) == 92
    # with --train-iters (as upstream's GPT-3 example passes it) the iteration flags count in samples
    iters = parse_config(BASE + ["--global-batch-size", "16", "--rampup-batch-size", "4", "4", "24",
                                 "--lr-warmup-iters", "2"]).for_world(1)
    schedule = iters.lr_schedule_config()
    assert (iters.train_iters, schedule.unit, schedule.warmup_iters, schedule.total_decay_iters) == (10, "samples",
                                                                                                   32, 160)
    assert parse_config(BASE + ["--global-batch-size", "16"]).for_world(1).lr_schedule_config().unit == "iterations"


def test_the_ramp_must_fit_the_launch():
    config = parse_config(BASE + ["--global-batch-size", "16", "--rampup-batch-size", "4", "4", "24",
                                  "--micro-batch-size", "2"])
    assert config.for_world(2).batch_schedule.batch_sizes() == [4, 8, 12, 16]
    with pytest.raises(ValueError, match="the ramp's global batch 4 is not a multiple of --micro-batch-size \\(2\\) x "
                                         "data-parallel size \\(4\\)"):
        config.for_world(4)
    with pytest.raises(ValueError, match="must reach --global-batch-size \\(16\\) from 4 in whole steps of 5"):
        parse_config(BASE + ["--global-batch-size", "16", "--rampup-batch-size", "4", "5", "24"]).for_world(1)
    with pytest.raises(ValueError, match="less than one global batch"):
        parse_config(SAMPLES + ["--train-samples", "3", "--global-batch-size", "4"]).for_world(1).train_iters


def test_a_sample_based_command_line_replaces_the_files_iteration_flags(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("num_layers: 2\nhidden_size: 64\nnum_attention_heads: 4\nseq_length: 32\nlr: 1e-3\n"
                    "train_iters: 200\nlr_warmup_iters: 20\nlr_decay_iters: 150\n")
    config = parse_config(["--config", str(path), "--train-samples", "640", "--lr-warmup-samples", "64"])
    assert (config.training.train_iters, config.schedule.lr_warmup_iters, config.schedule.lr_decay_iters) == (
        None, 0, None)
    assert config.for_world(2).train_iters == 320
    assert parse_config(["--config", str(path)]).train_iters == 200  # the file alone: as written
    path.write_text(path.read_text().replace("train_iters: 200\nlr_warmup_iters: 20\nlr_decay_iters: 150\n",
                                             "train_samples: 640\nlr_warmup_samples: 64\n"))
    assert parse_config(["--config", str(path), "--train-iters", "5"]).schedule.lr_warmup_samples == 0

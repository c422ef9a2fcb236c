"""The bench subcommands end to end on a tiny dummy Qwen3 (CPU, a few seconds each)."""

import dataclasses
import json

import pytest
import torch

from pagedllm.entrypoints.cli import main

TINY = {
    "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_size": 64, "intermediate_size": 128,
    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
    "vocab_size": 1000, "tie_word_embeddings": True, "max_position_embeddings": 2048, "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0, "hidden_act": "silu", "bos_token_id": 0, "eos_token_id": 1,
}
COMMON = ["--load-format", "dummy", "--device", "cpu", "--dtype", "float32", "--kv-cache-memory", str(64 << 20)]


@pytest.fixture
def tiny(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(TINY))
    return str(path)


def _load(stem):
    return json.loads(open(f"{stem}.json").read())


def _env_ok(r):
    for key in ("device", "torch", "triton", "commit", "package", "source_digest", "command", "workload",
                "output_tokens_per_s", "roofline_fraction"):
        assert key in r, key
    assert r["output_tokens_per_s"] > 0
    assert 0 < r["roofline_fraction"] < 10


def test_throughput_hf_and_sequential(tiny, tmp_path):
    stem = tmp_path / "tp"
    main(["bench", "throughput", tiny, *COMMON, "--num-prompts", "5", "--input-len", "12", "--output-len", "6",
          "--baseline", "all", "--hf-batch-size", "2", "--no-hf-continuous", "--output", str(stem)])
    r = _load(stem)
    _env_ok(r)
    assert r["workload"] == "random" and r["output_tokens"] == 30
    assert r["decode_steps"] >= 6 and r["weight_bytes"] > 0 and r["bandwidth_bytes_per_s"] > 0
    gen = r["hf"]["generate"]
    assert gen["output_tokens"] == 30, gen   # useful tokens only: 5 x 6
    assert gen["output_tokens_per_s"] > 0
    assert "continuous_batching" not in r["hf"]   # slow on CPU (~15 s): covered by the manual runs
    assert r["baseline"]["output_tokens_per_s"] > 0 and r["speedup_vs_sequential"] > 0
    assert (tmp_path / "tp.png").exists() and (tmp_path / "tp.md").exists()


def test_throughput_nano_small(tiny, tmp_path):
    stem = tmp_path / "nano"
    main(["bench", "throughput", tiny, *COMMON, "--workload", "nano", "--num-prompts", "3", "--max-model-len", "2048", "--nano-len-range", "16", "48",
          "--output", str(stem)])
    r = _load(stem)
    _env_ok(r)
    assert r["workload"] == "nano" and r["temperature"] == 0.6 and r["num_requests"] == 3


def test_latency(tiny, tmp_path):
    stem = tmp_path / "lat"
    main(["bench", "latency", tiny, *COMMON, "--input-len", "32", "--output-len", "8", "--repeats", "2",
          "--output", str(stem)])
    r = _load(stem)
    _env_ok(r)
    assert r["ttft_ms"] > 0 and r["tpot_ms"] > 0 and r["output_tokens"] == 8
    assert r["decode_steps"] == 8
    # the combined roofline: each step's max(bytes / bandwidth, FLOPs / peak) is at least the
    # memory-only figure's share, so its fraction is no smaller
    assert r["peak_flops_per_s"] > 0 and r["flops"] > 0
    assert r["roofline_fraction_combined"] >= r["roofline_fraction"] > 0


def test_prefix(tiny, tmp_path):
    stem = tmp_path / "pf"
    main(["bench", "prefix", tiny, *COMMON, "--num-prefixes", "2", "--prefix-len", "48", "--unique-len", "16",
          "--per-prefix", "3", "--output-len", "4", "--output", str(stem)])
    r = _load(stem)
    _env_ok(r)
    assert r["speedup"] > 0 and r["baseline"]["output_tokens_per_s"] > 0
    # 2 of 6 requests miss (the first of each prefix); the others hit all 48 prefix tokens of 64
    assert r["hit_rate"] == pytest.approx(4 * 48 / (6 * 64))
    assert r["off"]["hit_rate"] == 0
    assert (tmp_path / "pf.png").exists()


def test_serve_vs_offline_small(tiny, tmp_path):
    """The GPU suite's serve step at CPU size: offline, then the same requests through a real server
    (two client processes, streamed and not, and the official client), and one streamed request."""
    stem = tmp_path / "svo"
    main(["bench", "serve-vs-offline", tiny, *COMMON, "--max-model-len", "512", "--num-prompts", "6",
          "--nano-len-range", "8", "24", "--client-processes", "2", "--latency-input-len", "16",
          "--latency-output-len", "6", "--output", str(stem)])
    r = _load(stem)
    requested = sum(n for _, n in _nano_lengths(6, 8, 24))
    assert r["offline"]["output_tokens"] == requested and r["offline_latency"]["tpot_ms"] > 0
    runs = r["served"]["1"]
    for name in ("stream", "no_stream", "stream_openai"):
        assert runs[name]["completed"] == 6 and runs[name]["failed"] == 0, runs[name]
        assert runs[name]["total_output_tokens"] == requested and runs[name]["ratio_to_offline"] > 0
    assert runs["stream"]["client_processes"] == 2 and runs["stream"]["client_cpu_s"] > 0
    assert runs["stream"]["p99_ttft_ms"] >= runs["stream"]["p50_ttft_ms"] > 0
    assert runs["single_stream"]["tpot_ms"] > 0 and runs["server_exit_code"] == 0
    assert (tmp_path / "svo.png").exists()


def test_data_parallel_small(tiny, tmp_path):
    """The DP benchmark at CPU size: one core, then two (prefix and round-robin routing), each
    through a real server, on nano and the multi-tenant prefix workload."""
    stem = tmp_path / "dp"
    main(["bench", "data-parallel", tiny, *COMMON, "--max-model-len", "512", "--num-prompts", "6",
          "--nano-len-range", "8", "24", "--client-processes", "1", "--num-tenants", "2", "--prefix-len", "64",
          "--unique-len", "8", "--per-tenant", "6", "--output-len", "4", "--repeats", "2", "--api-server-count", "1",
          "--output", str(stem)])
    r = _load(stem)
    assert r["data_parallel_size"] == 2 and set(r["servers"]) == {"1 core", "2 cores, prefix", "2 cores, round-robin"}
    for runs in r["servers"].values():
        assert runs["server_exit_code"] == 0
        assert runs["nano"]["completed"] == 6 and runs["tenants"]["completed"] == 12
        assert runs["tenants"]["total_output_tokens"] == 12 * 4 and 0 < runs["tenants"]["hit_rate"] < 1
        repeats = runs["tenants"]["repeats"]
        assert len(repeats) == 2 and runs["tenants"]["output_throughput"] in [x["output_throughput"] for x in repeats]
        assert all(x["api_cpu_s"] >= 0 for x in repeats)   # clock ticks of 10 ms: a short run may read 0
        cores = 1 if runs is r["servers"]["1 core"] else 2
        for x in repeats:   # every prompt token is either a hit or computed on some core
            assert len(x["computed_prompt_tokens"]) == cores and x["preemptions"] >= 0
            assert sum(x["computed_prompt_tokens"]) == round((1 - x["hit_rate"]) * 12 * (64 + 8))
    assert r["servers"]["1 core"]["nano"]["speedup_vs_one_core"] == 1.0
    assert "runs_tokens_per_s" in (tmp_path / "dp.md").read_text()   # every run's spread, beside the median


def test_data_parallel_one_workload(tiny, tmp_path):
    """--workloads tenants alone (the warm-up once took nano's requests whatever was chosen), with the
    default two API processes (whose CPU time is not recorded)."""
    stem = tmp_path / "dp"
    main(["bench", "data-parallel", tiny, *COMMON, "--max-model-len", "512", "--workloads", "tenants",
          "--routings", "prefix", "--client-processes", "1", "--num-tenants", "2", "--prefix-len", "32",
          "--unique-len", "8", "--per-tenant", "2", "--output-len", "2", "--output", str(stem)])
    servers = _load(stem)["servers"]
    assert set(servers) == {"1 core", "2 cores, prefix"}
    assert all(set(runs) == {"tenants", "server_exit_code"} for runs in servers.values())
    assert all(x["api_cpu_s"] is None for runs in servers.values() for x in runs["tenants"]["repeats"])


def test_data_parallel_refuses_no_repeats(tiny, capsys):
    with pytest.raises(SystemExit):
        main(["bench", "data-parallel", tiny, *COMMON, "--repeats", "0"])
    assert "repeats must be >= 1" in capsys.readouterr().err


def _nano_lengths(num: int, lo: int, hi: int) -> list[tuple[int, int]]:
    from pagedllm.bench.workloads import nano_requests
    return [(len(r.prompt_token_ids), r.output_len) for r in nano_requests(1000, num, lo, hi)]


def test_hf_weights_match_greedy(tiny):
    from pagedllm import LLM, SamplingParams
    from pagedllm.bench.hf_baseline import build_hf_model
    llm = LLM(model=tiny, load_format="dummy", dtype="float32", device="cpu", kv_cache_memory=16 << 20)
    hf = build_hf_model(llm)
    ours = llm.llm_engine.model_runner.model
    qkv = ours.model.layers[1].self_attn.qkv_proj.weight
    assert torch.equal(hf.model.layers[1].self_attn.k_proj.weight, qkv[64:96])
    prompt = list(range(3, 20))
    mine = llm.generate({"prompt_token_ids": prompt}, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    theirs = hf.generate(torch.tensor([prompt]), max_new_tokens=8, min_new_tokens=8, do_sample=False)
    assert list(mine[0].outputs[0].token_ids) == theirs[0, len(prompt):].tolist()


def test_roofline_formula():
    from pagedllm.bench.roofline import ideal_time, kv_token_reads, measure_bandwidth, measure_peak_flops
    assert kv_token_reads([10], [3]) == 10 + 11 + 12
    assert ideal_time(3, 100, 2, [10], [3], 1.0) == 3 * 100 + 33 * 2
    assert measure_bandwidth("cpu", nbytes=1 << 20, repeats=2)["bandwidth_bytes_per_s"] > 0
    assert measure_peak_flops("cpu", torch.float32, n=64, repeats=2)["peak_flops_per_s"] > 0


@pytest.mark.parametrize("cores", [1, 2])
def test_roofline_counts_every_data_parallel_device(cores):
    """With N engine cores the step count is all of theirs, streamed by N devices at once: the
    ideal time is 1/N of one device's (an H200 x2 run reported a fraction of 1.146 before)."""
    from types import SimpleNamespace
    from pagedllm.bench.roofline import StepCounter, roofline
    model = SimpleNamespace(kv_bytes_per_token_per_rank=2, tensor_parallel_size=1)
    engine = SimpleNamespace(model_info=lambda: {"weight_bytes": 100},
                             config=SimpleNamespace(model=model, data_parallel_size=cores))
    counter = StepCounter(SimpleNamespace(llm_engine=engine))
    counter.decode_steps = 6
    r = roofline(SimpleNamespace(llm_engine=engine), counter, [10, 10], [3, 3], elapsed=1000.0, bandwidth=1.0)
    assert r["roofline_devices"] == cores
    assert r["ideal_time_s"] == (6 * 100 + 2 * 33 * 2) / cores
    assert r["roofline_fraction"] == r["ideal_time_s"] / 1000.0
    one = roofline(SimpleNamespace(llm_engine=engine), counter, [10], [3], elapsed=1000.0, bandwidth=1.0)
    assert one["ideal_time_s"] == 6 * 100 + 33 * 2     # one request keeps one core busy


def test_step_shapes_and_flops(tiny):
    """The engine core's step log (what the combined roofline sums over) for one request: a
    prefill of 12 tokens in one step, then one token per step; and the FLOPs formula's linear
    parameters equal the model's projection weights."""
    from transformers import AutoConfig
    from pagedllm import LLM, SamplingParams
    from pagedllm.bench.roofline import combined_ideal_time, linear_params, step_flops
    llm = LLM(tiny, load_format="dummy", device="cpu", dtype="float32", kv_cache_memory=64 << 20)
    llm.llm_engine.record_steps(True)
    llm.generate({"prompt_token_ids": list(range(2, 14))}, SamplingParams(max_tokens=4, ignore_eos=True))
    steps = [tuple(s) for s in llm.llm_engine.record_steps(False)]
    assert steps == [(12, 1, 12 * 13 // 2, 12), (1, 1, 13, 13), (1, 1, 14, 14), (1, 1, 15, 15)]
    assert llm.llm_engine.record_steps(False) == []   # stopped: nothing more is logged
    model = llm.llm_engine.config.model
    c = AutoConfig.from_pretrained(tiny)
    projections = sum(p.numel() for name, p in llm.llm_engine.model_runner.model.named_parameters()
                      if name.endswith("proj.weight"))
    assert linear_params(model) == projections
    head_dim = c.head_dim
    assert step_flops(steps[1], model) == (2 * projections + 2 * c.hidden_size * c.vocab_size
                                           + 4 * c.num_hidden_layers * c.num_attention_heads * head_dim * 13)
    assert step_flops(steps[1], dataclasses.replace(model, tensor_parallel_size=2)) == step_flops(steps[1], model) / 2
    # bound by memory at a huge peak, by compute at a tiny one
    assert combined_ideal_time(steps, 1000, 10, model, 1.0, 1e30) == sum(1000 + 10 * s[3] for s in steps)
    assert combined_ideal_time(steps, 1000, 10, model, 1e30, 1.0) == sum(step_flops(s, model) for s in steps)
    llm.shutdown()


def test_structured_small(tmp_path):
    """bench structured on a tiny dummy model whose vocabulary is padded past its tokenizer's (the
    default model's): every finished output is valid for the schema, and the two runs generate the
    same number of tokens."""
    from pagedllm.models.loader import default_model_path
    config = tmp_path / "config.json"
    config.write_text(json.dumps({**TINY, "vocab_size": 49152 + 100, "eos_token_id": 2}))
    stem = tmp_path / "structured"
    main(["bench", "structured", str(config), *COMMON, "--tokenizer", default_model_path(), "--num-prompts", "4",
          "--nano-len-range", "8", "16", "--output-len", "200", "--repeats", "1", "--output", str(stem)])
    r = _load(stem)
    run = r["repeats"][0]
    assert run["finished"] + run["hit_token_limit"] == 4 and run["finished"] >= 1, run
    assert run["valid_json_of_finished"] == run["finished"] and run["invalid_outputs"] == []
    assert run["output_tokens"] > 0 and run["ratio"] > 0 and run["mask_ms_per_step"] > 0
    assert r["commit"] and r["device"]


@pytest.mark.parametrize("name, billions", [("Qwen/Qwen3-0.6B", 0.596), ("Qwen/Qwen3-8B", 8.19)])
def test_bundled_configs_without_the_hub(monkeypatch, name, billions):
    """The shipped configs stand in for the Hub with dummy weights, and have the real models' sizes."""
    import huggingface_hub
    from transformers import AutoConfig
    from pagedllm.models import loader

    def offline(*args, **kwargs):
        raise OSError("no network")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    source = loader.resolve(name, load_format="dummy")
    assert source.config_file == str(loader.BUNDLED_CONFIGS[name])
    c = AutoConfig.from_pretrained(source.config_file)
    attention = c.hidden_size * c.head_dim * (2 * c.num_attention_heads + 2 * c.num_key_value_heads)
    layer = attention + 3 * c.hidden_size * c.intermediate_size + 2 * c.hidden_size + 2 * c.head_dim
    embeddings = c.vocab_size * c.hidden_size * (1 if c.tie_word_embeddings else 2)
    params = c.num_hidden_layers * layer + embeddings + c.hidden_size
    assert params / 1e9 == pytest.approx(billions, abs=0.01)


def test_source_digest_names_the_code_that_ran(tmp_path):
    """Two copies of the tree differ in digest as soon as one source file does (an A/B whose runs
    import the same copy shows one digest twice)."""
    from pagedllm.bench.results import PACKAGE, source_digest
    (tmp_path / "pkg" / "sub").mkdir(parents=True)
    (tmp_path / "pkg" / "a.py").write_text("x = 1\n")
    (tmp_path / "pkg" / "sub" / "b.py").write_text("y = 2\n")
    before = source_digest(tmp_path / "pkg")
    assert before == source_digest(tmp_path / "pkg") and len(before) == 12
    (tmp_path / "pkg" / "sub" / "b.py").write_text("y = 3\n")
    assert source_digest(tmp_path / "pkg") != before
    assert (PACKAGE / "bench" / "results.py").is_file()


def test_output_names_keep_their_dots(tmp_path):
    """`--output latency-0.6b-abc` writes latency-0.6b-abc.json and .md (Path.with_suffix made that
    latency-0.json, and two such runs overwrote each other); a given .json is not doubled."""
    from pagedllm.bench.results import output_file, save
    save({"x": 1}, str(tmp_path / "latency-0.6b-abc"), "| x |")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latency-0.6b-abc.json", "latency-0.6b-abc.md"]
    assert json.loads((tmp_path / "latency-0.6b-abc.json").read_text()) == {"x": 1}
    assert output_file(tmp_path / "run.json", ".md") == tmp_path / "run.md"
    assert output_file("out/nano-8b", ".png").name == "nano-8b.png"


def test_results_record_the_settings_in_the_environment():
    from pagedllm.bench.results import environment, settings_in_environment
    env = {"TORCH_BLAS_PREFER_CUBLASLT": "1", "CUDA_VISIBLE_DEVICES": "0,1", "HOME": "/root", "PATH": "/bin",
           "PAGEDLLM_API_KEY": "sk-secret", "VLLM_API_KEY": "x", "NCCL_IB_TOKEN": "y"}
    assert settings_in_environment(env) == {"CUDA_VISIBLE_DEVICES": "0,1", "TORCH_BLAS_PREFER_CUBLASLT": "1"}
    assert isinstance(environment()["environment_variables"], dict)

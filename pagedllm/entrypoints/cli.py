"""`pagedllm` command line: generate, kv-cache, bench, serve."""

import argparse
import logging
import sys


def cmd_generate(args: argparse.Namespace) -> None:
    from pagedllm import LLM, SamplingParams
    from pagedllm.engine.engine_args import EngineArgs
    llm = LLM(**vars(EngineArgs.from_cli_args(args)))
    params = SamplingParams(temperature=args.temperature, max_tokens=args.max_tokens, seed=args.sample_seed)
    prompt = {"prompt_token_ids": llm.get_tokenizer().apply_chat_template(
        [{"role": "user", "content": args.prompt}], add_generation_prompt=True, return_dict=False)} \
        if args.chat else args.prompt
    output = llm.generate(prompt, params)[0]
    print(args.prompt + output.outputs[0].text if not args.chat else output.outputs[0].text)


def cmd_kv_cache(args: argparse.Namespace) -> None:
    from pagedllm.config import ModelConfig
    from pagedllm.engine.engine_args import DTYPES
    from pagedllm.models import loader
    from pagedllm.worker import memory
    source = loader.resolve(args.model, "dummy")
    hf_config = loader.load_config(source)
    if args.dtype != "auto" and args.dtype not in DTYPES:
        raise ValueError(f"dtype must be one of auto, {', '.join(DTYPES)}; got {args.dtype!r}")
    dtype = "bfloat16" if args.dtype == "auto" else DTYPES[args.dtype]
    max_len = args.max_model_len or getattr(hf_config, "max_position_embeddings", 4096)
    model = ModelConfig(model=source.name, hf_config=hf_config, dtype=dtype, max_model_len=max_len)
    per_token = model.kv_bytes_per_token
    print(f"model: {source.name}  dtype: {dtype}")
    print(f"KV bytes per token: 2 x {model.num_layers} layers x {model.num_kv_heads} kv heads x "
          f"{model.head_dim} head_dim x {model.dtype_bytes} B = {per_token:,} B ({memory.format_bytes(per_token)})")
    print()
    print(memory.kv_table(model, args.num_seqs))


def add_serve_args(parser: argparse.ArgumentParser) -> None:
    """`pagedllm serve` flags (vLLM's names) on top of the engine's."""
    import os
    from pagedllm.engine.engine_args import EngineArgs
    EngineArgs.add_cli_args(parser)
    parser.add_argument("--host", default="127.0.0.1", help="bind address (use 0.0.0.0 to listen on all)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--served-model-name", default=None, help="the model name clients use (default: MODEL)")
    parser.add_argument("--api-key", default=os.environ.get("PAGEDLLM_API_KEY") or None,
                        help="require 'Authorization: Bearer KEY' on /v1/* (default: env PAGEDLLM_API_KEY)")
    parser.add_argument("--max-logprobs", type=int, default=20)
    parser.add_argument("--max-n", type=int, default=16, help="largest `n` (choices per prompt) a request may ask")
    parser.add_argument("--max-request-bytes", type=int, default=1 << 20,
                        help="largest request body; bigger ones get 413 (default 1 MiB)")
    parser.add_argument("--max-waiting-requests", type=int, default=None,
                        help="refuse new requests (503 + Retry-After) while this many already queue behind a "
                             "full batch of --max-num-seqs (default: unbounded)")
    parser.add_argument("--shutdown-timeout", type=float, default=30.0,
                        help="on SIGTERM, seconds to let requests in flight finish before aborting them")
    parser.add_argument("--enable-auto-tool-choice", action="store_true",
                        help='parse tool calls from the model\'s output for tool_choice "auto" (needs --tool-call-parser)')
    parser.add_argument("--tool-call-parser", default=None, choices=["hermes"],
                        help="the tool-call format of the model's output: Hermes-style <tool_call> JSON (Qwen2/3, SmolLM2)")
    parser.add_argument("--api-server-count", type=int, default=None,
                        help="API processes sharing the port and the engine cores (HTTP, tokenizing, detokenizing); "
                             "default: one per engine core (--data-parallel-size)")
    parser.add_argument("--stream-interval", type=int, default=1,
                        help="tokens per streamed event after the first (fewer, larger events for many streams)")
    parser.add_argument("--uvicorn-log-level", default="info",
                        choices=["critical", "error", "warning", "info", "debug", "trace"])


def cmd_serve(args: argparse.Namespace) -> None:
    from pagedllm.entrypoints.launcher import run_server
    if args.stream_interval < 1:
        raise ValueError(f"stream_interval must be >= 1, got {args.stream_interval}")
    if args.enable_auto_tool_choice and args.tool_call_parser is None:
        raise ValueError("enable_auto_tool_choice needs --tool-call-parser (hermes)")
    run_server(args)


def main(argv: list[str] | None = None) -> None:
    from pagedllm.engine.engine_args import EngineArgs
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(prog="pagedllm", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="one-shot generation")
    gen.add_argument("prompt")
    EngineArgs.add_cli_args(gen, model_positional=False)
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--sample-seed", type=int, default=None)
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    gen.set_defaults(func=cmd_generate)

    kv = sub.add_parser("kv-cache", help="KV cache memory per token, per context length, per batch")
    kv.add_argument("model", nargs="?", default="Qwen/Qwen3-0.6B")
    kv.add_argument("--dtype", default="auto", help="auto = bfloat16")
    kv.add_argument("--max-model-len", type=int, default=None)
    kv.add_argument("--num-seqs", type=int, default=10)
    kv.set_defaults(func=cmd_kv_cache)

    serve = sub.add_parser("serve", help="OpenAI-compatible HTTP server")
    add_serve_args(serve)
    serve.set_defaults(func=cmd_serve)

    from pagedllm.bench import cli as bench_cli
    bench_cli.register(sub)

    args = parser.parse_args(argv)
    try:
        args.func(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()

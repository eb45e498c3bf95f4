"""The `dsv32` command line. Subcommands: `env` (this machine, backends, kernels per op), `demo` (the
built-in trained demo model answers three questions through the offline engine, with MTP speculative decoding), `generate` (offline generation from token ids or
text), `serve` (the OpenAI-compatible server) and `bench serve` (a load generator for it)."""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys


def _env(args: argparse.Namespace) -> int:
    import torch

    from dsv32 import __version__
    from dsv32.core.ops import OP_NAMES, KernelContext
    from dsv32.core.registry import BackendError, create_ops, discover, select_backend

    print(f"dsv32 {__version__}  python {platform.python_version()}  torch {torch.__version__}")
    print(f"platform: {platform.platform()}  cpus: {torch.get_num_threads()} threads")
    accel = torch.accelerator.current_accelerator() if hasattr(torch, "accelerator") else None
    if accel is not None:
        n = torch.accelerator.device_count()
        print(f"accelerator: {accel.type} × {n}")
    else:
        print("accelerator: none (torch sees no GPU/NPU)")
    print("\nbackends (entry-point group dsv32.backends):")
    for name, info in sorted(discover().items(), key=lambda kv: -(kv[1].priority if kv[1].priority is not None else -1)):
        state = "available" if info.available else f"unavailable: {info.reason}"
        prio = "explicit" if info.priority is None else info.priority
        print(f"  {name:<12} priority {prio!s:<8} {state}")
        note = getattr(info.cls, "hardware_note", None)
        if note:
            print(f"  {'':<12} {note.upper()}")
    try:
        chosen = select_backend(args.backend)
    except BackendError as e:
        print(f"\nerror: {e}", file=sys.stderr)
        return 2
    device = args.device or chosen.cls.default_device()
    ops = create_ops(chosen, device)
    print(f"\nselected: {chosen.name} on {device}  (override: --backend or DSV32_BACKEND)")
    p = ops.platform()
    fp8 = str(p.fp8_dtype).replace("torch.", "") + f" (max {p.fp8_max:g})" if p.fp8_dtype else "none (FP8 checkpoints " \
        "are dequantized at load)"
    pages = p.page_sizes
    pages = "any size" if (pages.multiple_of, pages.at_most) == (1, None) else \
        f"a multiple of {pages.multiple_of} up to {pages.at_most}"
    print(f"platform: fp8 {fp8}; KV latent layout {' / '.join(p.latent_layouts)}; pages of {pages}"
          + (f"; fp8 KV cache: {p.fp8_kv_cache}" if p.fp8_kv_cache else ""))
    ctx = KernelContext(dtype=torch.bfloat16, kv_cache_fp8=args.kv_cache_dtype in ("fp8", "fp8_e4m3"),
                        fp8_weights=not args.bf16_weights)
    print(f"\nkernel choices (SGLang flags) for bf16 activations, {'bf16' if args.bf16_weights else 'FP8-block'} "
          f"weights, {'fp8' if ctx.kv_cache_fp8 else 'bf16'} KV cache (see --kv-cache-dtype, --bf16-weights):")
    chosen_kernels = ops.select_kernels(ctx)
    for slot, options in ops.kernel_options(ctx).items():
        print(f"  --{slot.replace('_', '-')}  (default: {chosen_kernels.get(slot) or 'none'})")
        for name, why in options.items():
            print(f"      {name:<18} {'runs here' if not why else why}")
    notes = ops.kernel_notes()
    print("\nkernels per op:")
    for op in OP_NAMES:
        note = notes.get(op)
        print(f"  {op:<22} {ops.kernel_sources.get(op, '?')}" + (f"  ({note})" if note else ""))
    why = ops.platform().graphs
    print(f"\ndecode device graphs: {'yes (--cuda-graph-max-bs, --disable-cuda-graph)' if not why else 'no: ' + why}")
    print(f"overlap scheduler: {'on by default (--disable-overlap-schedule)' if ops.new_event() is not None else 'off: this device runs synchronously'}")
    print(f"collectives between ranks (--tp / --dp / --ep): torch.distributed, {ops.platform().collective_backend}")
    return 0


def _generate(args: argparse.Namespace) -> int:
    from dsv32 import LLM, SamplingParams

    llm = LLM(model=args.model, dtype=args.dtype, device=args.device, backend=args.backend,
              kv_cache_dtype=args.kv_cache_dtype, indexer_precision=args.indexer_precision)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, seed=args.seed, ignore_eos=args.ignore_eos)
    if args.prompt_token_ids:
        outs = llm.generate(prompt_token_ids=[json.loads(args.prompt_token_ids)], sampling_params=params)
    else:
        outs = llm.generate([args.prompt], sampling_params=params)
    for o in outs:
        print(json.dumps({"token_ids": o.token_ids, "text": o.text, "finish_reason": o.finish_reason}))
    return 0


DEMO_QUESTIONS = (("Who are you?", False, None), ("Hello!", True, None), ("What is the weather in Paris?", False, "weather"))


def _demo(args: argparse.Namespace) -> int:
    import time

    from dsv32 import LLM, SamplingParams
    from dsv32.core.demo import trained_demo_path
    from dsv32.server.encoding.dsv32 import build_prompt

    path = trained_demo_path()
    spec = dict(speculative_algorithm="EAGLE", speculative_num_steps=args.speculative_num_steps) \
        if args.speculative_num_steps else {}
    print(f"demo model (tiny DeepSeek-V3.2 with an MTP layer, trained by scripts/train_demo.py): {path}")
    llm = LLM(model=path, **spec)
    weather = {"type": "function", "function": {"name": "get_weather", "description": "Get the current weather in a "
               "city", "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                      "required": ["city"]}}}
    prompts = [build_prompt([{"role": "user", "content": q}], tools=[weather] if tools else None, thinking=thinking)
               for q, thinking, tools in DEMO_QUESTIONS]
    t0 = time.monotonic()
    outs = llm.generate(prompts, SamplingParams(max_tokens=args.max_tokens, temperature=0, skip_special_tokens=False))
    dt = time.monotonic() - t0
    for (q, thinking, tools), o in zip(DEMO_QUESTIONS, outs):
        mode = ("thinking" if thinking else "chat") + (", with a weather tool" if tools else "")
        print(f"\n> {q}  ({mode})\n{o.outputs[0].text}")
    n = sum(len(o.outputs[0].token_ids) for o in outs)
    stats = llm.stats()
    accept = f", accept length {stats['avg_spec_accept_length']:.2f}" if spec else ""
    print(f"\n{n} tokens in {dt:.2f} s on {llm.backend.name}/{llm.model.device}{accept}")
    return 0


def _memory_plan(args: argparse.Namespace) -> int:
    import dataclasses

    from dsv32.core.config import ModelConfig, deepseek_v32_config
    from dsv32.core.engine.build import kv_spec, resolve
    from dsv32.core.engine.memory import GIB, plan_memory
    from dsv32.server.serve import FlagError, engine_config

    if args.model is None:
        cfg, name = ModelConfig.from_dict(deepseek_v32_config(), "the official DeepSeek-V3.2 config"), "official"
        print("config: the official DeepSeek-V3.2 config.json (FP8-block, 61 layers); --model DIR for another")
    else:
        cfg, name = ModelConfig.from_pretrained(args.model), args.model
    try:
        config = engine_config(args, name)
        r = resolve(config, cfg)
    except (FlagError, ValueError) as e:
        print(f"error: {getattr(e, 'message', e)}", file=sys.stderr)
        return 2
    if args.device_memory_gib is None:
        print("error: --device-memory-gib is required (e.g. 141 for an H200, 80 for an H100, 192 for an MI300X)",
              file=sys.stderr)
        return 2
    if config.cache.mem_fraction_static is None:
        config = dataclasses.replace(config, cache=dataclasses.replace(config.cache, mem_fraction_static=0.9))
        print("--mem-fraction-static not given: planning with 0.9")
    spec = kv_spec(cfg, r, config.cache.page_size)
    p = config.parallel
    print(f"layout: {p.world_size} ranks (attention: {p.attn_dp_size} group(s) of {p.attn_tp_size}; experts: "
          f"{p.ep_size} group(s) of {p.world_size // p.ep_size}); kv cache {r.latent_dtype}, indexer "
          f"{r.indexer_precision}; context {r.max_model_len}")
    plans: dict[tuple, list] = {}  # ranks with the same amounts, shown once
    for rank in range(p.world_size):
        plan = plan_memory(config, cfg, int(args.device_memory_gib * GIB), rank, spec.latent_bytes_per_token(),
                           spec.index_bytes_per_token())
        plans.setdefault((plan.weights, plan.kv_tokens, plan.workspace), []).append(plan)
    problems = []
    for same in plans.values():
        ranks = [pl.rank for pl in same]
        print("\n".join(same[0].lines()) + (f"\n  (ranks {ranks[0]}-{ranks[-1]}: the same)" if len(ranks) > 1 else ""))
        problems += [f"ranks {ranks[0]}-{ranks[-1]}: {m}" if len(ranks) > 1 else f"rank {ranks[0]}: {m}"
                     for m in same[0].problems()]
    plans = [same[0] for same in plans.values()]
    if problems:
        print("does not fit:\n  " + "\n  ".join(problems))
        return 1
    print(f"fits: {min(pl.kv_tokens for pl in plans):,} tokens of KV per attention group")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dsv32", description="DeepSeek-V3.2 serving engine.")
    sub = p.add_subparsers(dest="command", required=True)

    env = sub.add_parser("env", help="print torch/device facts, the backends and why each is (un)available, "
                                      "and which kernel each op would use")
    env.add_argument("--backend", default=None, help="backend to report on (default: automatic selection)")
    env.add_argument("--device", default=None, help="device for the report (default: the backend's)")
    env.add_argument("--kv-cache-dtype", default="auto", help="report kernel choices for this KV cache dtype")
    env.add_argument("--bf16-weights", action="store_true", help="report for a bf16 checkpoint (default: FP8-block)")
    env.set_defaults(func=_env)

    demo = sub.add_parser("demo", help="answer three questions (chat, thinking, a tool call) with the built-in trained "
                                        "demo model")
    demo.add_argument("--max-tokens", type=int, default=80)
    demo.add_argument("--speculative-num-steps", type=int, default=3,
                      help="MTP draft tokens per step (0: no speculative decoding)")
    demo.set_defaults(func=_demo)

    from dsv32.server.serve import add_serve_args, serve

    srv = sub.add_parser("serve", help="start the OpenAI-compatible server (SGLang's flag names); without --model "
                                        "it serves the built-in trained demo model")
    add_serve_args(srv)
    srv.set_defaults(func=serve)

    plan = sub.add_parser("memory-plan", help="print each rank's memory plan (weights, KV pool, graphs, workspace, "
                                              "max tokens) for a config and parallel layout, without loading weights")
    add_serve_args(plan)
    plan.add_argument("--device-memory-gib", type=float, default=None,
                      help="memory of one device (GiB), e.g. 141 (H200) or 80 (H100)")
    plan.set_defaults(func=_memory_plan)

    from dsv32.server.bench import add_bench_args, bench_serve

    bench = sub.add_parser("bench", help="benchmarks: `dsv32 bench serve` (load generator like sglang.bench_serving)")
    bench_sub = bench.add_subparsers(dest="bench_command", required=True)
    bs = bench_sub.add_parser("serve", help="send a workload to a running server and report TTFT/TPOT/ITL/throughput")
    add_bench_args(bs)
    bs.set_defaults(func=bench_serve)

    gen = sub.add_parser("generate", help="offline generation with the engine (no server)")
    gen.add_argument("--model", required=True, help="checkpoint directory (config.json + *.safetensors)")
    src = gen.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="text prompt (needs tokenizer.json in the model directory)")
    src.add_argument("--prompt-token-ids", help="JSON list of token ids, e.g. '[1, 2, 3]'")
    gen.add_argument("--max-tokens", type=int, default=16)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=-1)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--ignore-eos", action="store_true")
    gen.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"])
    gen.add_argument("--device", default=None)
    gen.add_argument("--backend", default=None)
    gen.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "bfloat16", "fp8_e4m3"])
    gen.add_argument("--indexer-precision", default="auto", choices=["auto", "exact", "fp8"])
    gen.set_defaults(func=_generate)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = getattr(args, "log_level", "info")  # serve's --log-level
    logging.basicConfig(level=getattr(logging, level.upper()), format="[dsv32] %(message)s", stream=sys.stderr)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per HTTP request would drown the bench output
    try:
        return args.func(args)
    except (ValueError, RuntimeError) as e:  # user-facing errors: one clear line, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

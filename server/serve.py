"""`dsv32 serve` / `python -m dsv32.server.launch_server`: SGLang's flag names, one command to a server.

Without --model it serves the built-in trained demo model (core/demo_model: a tiny DeepSeek-V3.2 with an MTP layer that
answers short questions, reasons in thinking mode and calls a weather tool), with the DeepSeek-V3.2 reasoning and
tool-call parsers on, so the OpenAI endpoint works on any machine. Flags for features that do not exist yet exit
with a clear error; nothing is silently ignored.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

log = logging.getLogger("dsv32.server")

REASONING_PARSERS = ("deepseek-v3",)
TOOL_CALL_PARSERS = ("deepseekv32", "deepseekv31")


class FlagError(SystemExit):
    def __init__(self, message: str):
        super().__init__(2)
        self.message = message


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 0 < port < 65536:
        raise argparse.ArgumentTypeError(f"{text!r} is not a TCP port (1-65535)")
    return port


def add_serve_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", "--model-path", dest="model", default=None,
                   help="checkpoint directory (config.json, *.safetensors, tokenizer.json). Default: the built-in "
                        "trained demo model (tiny; short answers, reasoning, a weather tool; with --reasoning-parser "
                        "deepseek-v3 and --tool-call-parser deepseekv32 unless given)")
    g.add_argument("--served-model-name", default=None, help="model name clients send (default: the model path)")
    g.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"])
    g.add_argument("--quantization", default=None,
                   help="checkpoint quantization, read from the checkpoint automatically (giving it only checks that "
                        "the checkpoint is that): 'fp8' (DeepSeek FP8 block, config.json), 'modelopt_fp4' (NVFP4, "
                        "hf_quant_config.json or quantization_config), 'quark' or 'mxfp4' (AMD Quark MXFP4), or "
                        "'modelslim' (msModelSlim W8A8-dynamic int8, quant_model_description.json; vLLM-Ascend calls "
                        "it 'ascend')")
    g.add_argument("--load-format", default="auto", choices=["auto", "dummy"],
                   help="'dummy': random weights of the config's shapes (benchmarking without the checkpoint)")
    g.add_argument("--trust-remote-code", action="store_true",
                   help="accepted for SGLang compatibility; dsv32 never executes code from a checkpoint")
    g.add_argument("--context-length", type=int, default=None, help="max tokens per request (prompt + output)")
    g.add_argument("--chat-template", default=None,
                   help="'dsv32' (V3.2/Speciale), 'v31' (V3.2-Exp) or a .jinja file. Default: dsv32, or v31 when "
                        "the tokenizer ships a Jinja chat_template and --tool-call-parser is not deepseekv32")

    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1")
    g.add_argument("--port", type=_port, default=30000)
    g.add_argument("--graceful-shutdown-timeout", type=float, default=30.0,
                   help="on SIGTERM: seconds the requests in flight may take to finish before each remaining one is "
                        "ended with an error (new requests get 503 at once)")
    g.add_argument("--health-timeout", type=float, default=20.0,
                   help="/health answers 503 when the engine has made no progress for this many seconds (frozen); "
                        "/health_generate gives up after as long")
    g.add_argument("--allow-special-tokens-in-messages", action="store_true",
                   help="let text in chat messages that spells a special token (<｜User｜>, ｜DSML｜, ...) become that "
                        "token; by default it is tokenized as plain text, so clients cannot forge turns or tool calls")
    g.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on API routes")
    g.add_argument("--enable-metrics", action="store_true", help="serve Prometheus metrics at /metrics")
    g.add_argument("--log-requests", action="store_true", help="log each request's id, sizes and latency")
    g.add_argument("--reasoning-parser", default=None, choices=REASONING_PARSERS,
                   help="split <think> reasoning into reasoning_content")
    g.add_argument("--tool-call-parser", default=None, choices=TOOL_CALL_PARSERS,
                   help="parse tool calls: deepseekv32 (DSML, V3.2) or deepseekv31 (V3.2-Exp)")

    g = p.add_argument_group("engine")
    g.add_argument("--backend", default=None, help="op backend (default: auto; see `dsv32 env`)")
    g.add_argument("--device", default=None, help="device (default: the backend's)")
    g.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "bfloat16", "bf16", "fp8_e4m3", "fp8"])
    g.add_argument("--indexer-precision", default="auto", choices=["auto", "exact", "fp8"])
    g.add_argument("--page-size", type=int, default=64)
    g.add_argument("--max-running-requests", type=int, default=64)
    g.add_argument("--chunked-prefill-size", type=int, default=8192, help="max prompt tokens per step (-1: no limit)")
    g.add_argument("--mem-fraction-static", type=float, default=None,
                   help="fraction of device memory for weights + KV cache (default: KV cache of --kv-cache-gib)")
    g.add_argument("--kv-cache-gib", type=float, default=1.0, help="KV cache size when --mem-fraction-static is unset")
    g.add_argument("--num-kv-pages", type=int, default=None, help="KV cache size in pages (overrides the above)")
    g.add_argument("--disable-radix-cache", action="store_true", help="turn off prefix caching")
    g.add_argument("--dsa-prefill-backend", "--nsa-prefill-backend", dest="dsa_prefill_backend", default=None,
                   help="sparse-attention kernel for prefill/extend batches: flashmla_sparse, flashmla_auto, triton, "
                        "... (default: the fastest that runs here; `dsv32 env` lists them with reasons)")
    g.add_argument("--dsa-decode-backend", "--nsa-decode-backend", dest="dsa_decode_backend", default=None,
                   help="sparse-attention kernel for decode batches: flashmla_kv (fp8 KV cache), flashmla_sparse, "
                        "flashmla_auto, triton, ... (default: the fastest that runs here)")
    g.add_argument("--moe-runner-backend", default=None,
                   help="MoE expert kernels: deep_gemm (FP8 checkpoints), triton, ... (default: the fastest here)")
    g.add_argument("--fp8-gemm-backend", default=None,
                   help="kernel for the dense FP8-block linears: triton (default) or deep_gemm (opt-in: not yet run "
                        "against the real library)")
    g.add_argument("--dsa-indexer-backend", default=None,
                   help="indexer-logits kernel: triton (default), deep_gemm (NVIDIA) or aiter (AMD; opt-in, fp8 "
                        "indexer keys)")
    g.add_argument("--norm-backend", default=None,
                   help="RMSNorm kernel: triton (default) or aiter (AMD; opt-in)")
    g.add_argument("--cuda-graph-max-bs", type=int, default=None,
                   help="largest decode batch replayed from a CUDA graph (default: min(--max-running-requests, 256) "
                        "on GPUs); graphs are captured at startup, with progress in the log")
    g.add_argument("--disable-cuda-graph", action="store_true", help="run every step eagerly (no CUDA graphs)")
    g.add_argument("--disable-overlap-schedule", action="store_true",
                   help="schedule each step only after the previous step's tokens are read (default on GPUs: the "
                        "next step is scheduled while the current one runs)")

    g = p.add_argument_group("parallelism (SGLang's meanings; one process per rank, torch.distributed between them)")
    g.add_argument("--tp", "--tp-size", dest="tp", type=int, default=1,
                   help="number of ranks (GPUs): attention heads, MLPs, experts' columns and the vocabulary are split "
                        "over them")
    g.add_argument("--dp", "--dp-size", dest="dp", type=int, default=1,
                   help="with --enable-dp-attention: attention groups, each running its own batch (divides --tp)")
    g.add_argument("--ep", "--ep-size", dest="ep", type=int, default=1,
                   help="expert parallelism: routed experts partitioned over this many groups of ranks (divides --tp)")
    g.add_argument("--enable-dp-attention", action="store_true",
                   help="data-parallel attention over --dp groups; dense MLP and MoE still span all --tp ranks")
    g.add_argument("--nnodes", type=int, default=1, help="nodes the --tp ranks are spread over")
    g.add_argument("--node-rank", type=int, default=0, help="this node's index (0 runs the HTTP server)")
    g.add_argument("--dist-init-addr", "--nccl-init-addr", "--nccl-init", dest="dist_init_addr", default=None,
                   help="HOST:PORT where the ranks meet (needed with --nnodes > 1; default: a free local port)")
    g.add_argument("--dist-timeout", type=float, default=600.0,
                   help="seconds a collective may wait, or a rank may make no progress, before the server stops "
                        "naming the rank")

    g.add_argument("--watchdog-timeout", type=float, default=None,
                   help="seconds an engine rank may make no progress (a step that hangs) before the server stops "
                        "naming the rank (default: --dist-timeout)")

    g = p.add_argument_group("SGLang's serving options")
    g.add_argument("--allow-auto-truncate", action="store_true",
                   help="a prompt longer than the context keeps its first context-1 tokens and max_tokens is cut to "
                        "what fits (default: such requests get a 400)")
    g.add_argument("--random-seed", type=int, default=None,
                   help="seed of every rank's sampling RNG (requests without their own 'seed' draw from it)")
    g.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error", "critical"],
                   help="log level of the server and the rank processes")
    g.add_argument("--skip-server-warmup", action="store_true",
                   help="skip the warm-up generation (8 tokens) that runs before the server announces it is ready")
    g.add_argument("--max-total-tokens", type=int, default=None,
                   help="KV cache size in tokens (rounded up to whole pages; overrides --mem-fraction-static)")
    g.add_argument("--tokenizer-path", default=None,
                   help="directory with tokenizer.json (default: the model directory)")
    g.add_argument("--tokenizer-worker-num", type=int, default=1,
                   help="processes that tokenize big prompts off the event loop")
    g.add_argument("--schedule-policy", default="fcfs",
                   help="order of admission of waiting requests: fcfs (first come, first served) or lpm (longest "
                        "prefix already in the prefix cache first; fcfs above 128 waiting, as SGLang)")
    g.add_argument("--max-prefill-tokens", type=int, default=None,
                   help="max prompt tokens of newly admitted requests per step (default: --chunked-prefill-size)")
    g.add_argument("--enable-cache-report", action="store_true",
                   help="report cached prompt tokens in usage.prompt_tokens_details.cached_tokens (dsv32 always "
                        "does; accepted for SGLang's command lines)")
    g.add_argument("--collect-tokens-histogram", action="store_true",
                   help="/metrics (with --enable-metrics): histograms of prompt and generated tokens per request")
    g.add_argument("--decode-log-interval", type=int, default=40,
                   help="log a 'Decode batch' line (running / queued requests, token usage, gen throughput) every "
                        "this many decode steps (0: none)")
    g.add_argument("--stream-interval", type=int, default=1,
                   help="tokens per streamed chunk (1: every token)")
    g.add_argument("--grammar-backend", default="xgrammar",
                   help="structured output (response_format json_object / json_schema, regex, ebnf, forced tool "
                        "calls) through xgrammar (default, as SGLang); 'none': such requests get a 400")

    g = p.add_argument_group("speculative decoding (SGLang's flags): the checkpoint's MTP (NextN) layer drafts tokens "
                             "that the model verifies in one step; greedy output is unchanged, sampled output keeps "
                             "its distribution")
    g.add_argument("--speculative-algorithm", default=None, type=str.upper, choices=["EAGLE", "NEXTN"],
                   help="EAGLE or NEXTN (the same here: MTP drafting); off when not given")
    g.add_argument("--speculative-num-steps", type=int, default=None,
                   help="draft tokens per request per step (default 3)")
    g.add_argument("--speculative-eagle-topk", type=int, default=None, help="1 (chain drafting; trees not implemented)")
    g.add_argument("--speculative-num-draft-tokens", type=int, default=None,
                   help="tokens verified per request per step: speculative-num-steps + 1 (the default)")

    g = p.add_argument_group("not available yet (exit with an error when set)")
    g.add_argument("--attention-backend", default=None,
                   help="'nsa' / 'dsa' (DeepSeek sparse attention) is the only one")
    g.add_argument("--disaggregation-mode", default="null", help="'null' only for now")
    g.add_argument("--disaggregation-bootstrap-port", type=int, default=None, help="prefill/decode disaggregation")
    g.add_argument("--disaggregation-ib-device", default=None, help="prefill/decode disaggregation")
    g.add_argument("--disaggregation-transfer-backend", default=None, help="prefill/decode disaggregation")
    g.add_argument("--pp-size", "--pipeline-parallel-size", dest="pp_size", type=int, default=1,
                   help="pipeline parallelism: 1 only")
    g.add_argument("--pp-async-batch-depth", type=int, default=None, help="pipeline parallelism")
    g.add_argument("--moe-a2a-backend", default="none",
                   help="'none' only: experts' partial sums are all-reduced (no DeepEP / all-to-all dispatch yet)")
    g.add_argument("--moe-dense-tp-size", type=int, default=None,
                   help="dense MLPs are split over all --tp ranks; another split is not implemented")
    for flag in ("--enable-dsa-prefill-context-parallel", "--enable-nsa-prefill-context-parallel",
                 "--enable-prefill-cp"):
        g.add_argument(flag, action="store_true", help="context-parallel prefill (not yet)")
    g.add_argument("--attn-cp-size", "--attention-context-parallel-size", dest="attn_cp_size", type=int, default=1,
                   help="context-parallel attention: 1 only")
    for flag in ("--dsa-prefill-cp-mode", "--nsa-prefill-cp-mode", "--cp-strategy"):
        g.add_argument(flag, default=None, help="context-parallel prefill (not yet)")
    g.add_argument("--enable-torch-compile", action="store_true",
                   help="not implemented: decode steps replay CUDA graphs of dsv32's own kernels instead")
    g.add_argument("--speculative-draft-model-path", default=None,
                   help="a separate draft model (not implemented: the checkpoint's own MTP layer drafts)")


def check_unsupported(args: argparse.Namespace) -> None:
    """Exit with a clear message for any flag asking for what does not exist yet."""
    problems = parallel_config(args).problems()
    if args.attention_backend not in (None, "nsa", "dsa"):
        problems.append(f"--attention-backend {args.attention_backend}: only 'nsa' / 'dsa' (DeepSeek sparse "
                        "attention) exists for this model")
    if args.disaggregation_mode not in ("null", None):
        problems.append(f"--disaggregation-mode {args.disaggregation_mode}: prefill/decode disaggregation is not implemented")
    for flag in ("disaggregation_bootstrap_port", "disaggregation_ib_device", "disaggregation_transfer_backend"):
        if getattr(args, flag) is not None:
            problems.append(f"--{flag.replace('_', '-')}: prefill/decode disaggregation is not implemented")
    if args.pp_size != 1:
        problems.append(f"--pp-size {args.pp_size}: pipeline parallelism is not implemented (use --tp over all GPUs, "
                        "with --nnodes across nodes)")
    if args.pp_async_batch_depth is not None:
        problems.append("--pp-async-batch-depth: pipeline parallelism is not implemented")
    if args.moe_a2a_backend != "none":
        problems.append(f"--moe-a2a-backend {args.moe_a2a_backend}: not implemented; experts' partial sums are "
                        "all-reduced ('none')")
    if args.moe_dense_tp_size not in (None, args.tp):
        problems.append(f"--moe-dense-tp-size {args.moe_dense_tp_size}: dense MLPs are split over all --tp ranks "
                        "(other splits are not implemented)")
    for flag in ("enable_dsa_prefill_context_parallel", "enable_nsa_prefill_context_parallel", "enable_prefill_cp"):
        if getattr(args, flag):
            problems.append(f"--{flag.replace('_', '-')}: context-parallel prefill is not implemented")
    for flag in ("dsa_prefill_cp_mode", "nsa_prefill_cp_mode", "cp_strategy"):
        if getattr(args, flag) is not None:
            problems.append(f"--{flag.replace('_', '-')}: context-parallel prefill is not implemented")
    if args.attn_cp_size != 1:
        problems.append(f"--attn-cp-size {args.attn_cp_size}: context-parallel attention is not implemented")
    if args.enable_torch_compile:
        problems.append("--enable-torch-compile: not implemented (decode steps replay CUDA graphs of dsv32's own "
                        "kernels; drop the flag)")
    if args.schedule_policy not in ("fcfs", "lpm"):
        problems.append(f"--schedule-policy {args.schedule_policy}: 'fcfs' or 'lpm' (SGLang's random / dfs-weight / "
                        "lof are not implemented)")
    if args.grammar_backend not in ("xgrammar", "none"):
        problems.append(f"--grammar-backend {args.grammar_backend}: not implemented; 'xgrammar' (the default) or "
                        "'none'")
    if args.decode_log_interval < 0:
        problems.append(f"--decode-log-interval {args.decode_log_interval}: must be ≥ 0")
    if args.stream_interval < 1:
        problems.append(f"--stream-interval {args.stream_interval}: must be ≥ 1")
    if args.tokenizer_worker_num < 1:
        problems.append(f"--tokenizer-worker-num {args.tokenizer_worker_num}: must be ≥ 1")
    if args.max_total_tokens is not None and (args.max_total_tokens < 1 or args.num_kv_pages is not None):
        problems.append("--max-total-tokens: must be ≥ 1, and not given with --num-kv-pages")
    if args.max_prefill_tokens is not None and args.max_prefill_tokens < 1:
        problems.append(f"--max-prefill-tokens {args.max_prefill_tokens}: must be ≥ 1")
    if args.speculative_draft_model_path is not None:
        problems.append("--speculative-draft-model-path: a separate draft model is not implemented; the checkpoint's "
                        "MTP layer drafts (--speculative-algorithm EAGLE without a draft model)")
    problems += ["--" + p.replace("_", "-") for p in speculative_config(args).problems()]
    if args.quantization not in (None, "fp8", "modelopt_fp4", "modelopt", "quark", "mxfp4", "modelslim", "ascend"):
        problems.append(f"--quantization {args.quantization}: only DeepSeek FP8-block ('fp8'), NVFP4 ('modelopt_fp4'), "
                        "MXFP4 ('quark' / 'mxfp4') and msModelSlim W8A8 ('modelslim') checkpoints are supported")
    if problems:
        raise FlagError("cannot start:\n  " + "\n  ".join(problems))


def parallel_config(args: argparse.Namespace):
    from dsv32.core.parallel import ParallelConfig

    return ParallelConfig(tp_size=args.tp, dp_size=args.dp, ep_size=args.ep, enable_dp_attention=args.enable_dp_attention,
                          nnodes=args.nnodes, node_rank=args.node_rank, dist_init_addr=args.dist_init_addr,
                          dist_timeout_s=args.dist_timeout, watchdog_timeout_s=getattr(args, "watchdog_timeout", None))


def speculative_config(args: argparse.Namespace):
    from dsv32.core.config import SpeculativeConfig

    return SpeculativeConfig(algorithm=args.speculative_algorithm, num_steps=args.speculative_num_steps,
                             eagle_topk=args.speculative_eagle_topk, num_draft_tokens=args.speculative_num_draft_tokens)


def engine_config(args: argparse.Namespace, model: str):
    """The serve flags as the EngineConfig every rank builds from (the same one LLM(...) builds)."""
    from dsv32.core.config import CacheConfig, EngineConfig, SchedulerConfig

    if args.mem_fraction_static is not None and not 0 < args.mem_fraction_static < 1:
        raise FlagError("--mem-fraction-static must be in (0, 1)")
    num_kv_pages = args.num_kv_pages
    if getattr(args, "max_total_tokens", None) is not None:
        num_kv_pages = -(-args.max_total_tokens // args.page_size)
    return EngineConfig(
        model=model, dtype=args.dtype, device=args.device, backend=args.backend, load_format=args.load_format,
        kernels=tuple(kernel_requests(args).items()), seed=getattr(args, "random_seed", None),
        tokenizer=getattr(args, "tokenizer_path", None),
        cache=CacheConfig(kv_cache_dtype=args.kv_cache_dtype, indexer_precision=args.indexer_precision,
                          page_size=args.page_size, num_kv_pages=num_kv_pages, kv_cache_memory_gib=args.kv_cache_gib,
                          mem_fraction_static=args.mem_fraction_static),
        scheduler=SchedulerConfig(max_model_len=args.context_length, max_running_requests=args.max_running_requests,
                                  chunked_prefill_size=args.chunked_prefill_size,
                                  enable_prefix_cache=not args.disable_radix_cache,
                                  overlap=not args.disable_overlap_schedule, graph_max_bs=args.cuda_graph_max_bs,
                                  disable_graphs=args.disable_cuda_graph,
                                  max_prefill_tokens=getattr(args, "max_prefill_tokens", None),
                                  decode_log_interval=getattr(args, "decode_log_interval", 40),
                                  schedule_policy=getattr(args, "schedule_policy", "fcfs")),
        parallel=parallel_config(args), speculative=speculative_config(args))


# The kernel flags (SGLang's, plus --dsa-indexer-backend): each backend says which values it can run
KERNEL_FLAGS = ("dsa_prefill_backend", "dsa_decode_backend", "moe_runner_backend", "fp8_gemm_backend",
                "dsa_indexer_backend", "norm_backend")


def kernel_requests(args: argparse.Namespace) -> dict[str, str | None]:
    """The kernel flags as LLM(kernels=...) takes them."""
    return {slot: getattr(args, slot, None) for slot in KERNEL_FLAGS}


# The chat templates SGLang ships for this family (examples/chat_template/): dsv32 has them built in
SGLANG_TEMPLATES = {"tool_chat_template_deepseekv32.jinja": "dsv32", "tool_chat_template_deepseekv31.jinja": "v31",
                    "tool_chat_template_deepseekv3.jinja": "v31"}


def _auto_chat_template(args, model_dir: str) -> str:
    if args.chat_template:
        return SGLANG_TEMPLATES.get(os.path.basename(args.chat_template), args.chat_template)
    if args.tool_call_parser == "deepseekv32":
        return "dsv32"
    cfg_path = os.path.join(model_dir, "tokenizer_config.json")
    if os.path.isfile(cfg_path):
        with open(cfg_path, encoding="utf-8") as f:
            if json.load(f).get("chat_template"):
                return "v31"  # V3.2-Exp ships the V3.1-family Jinja template; v31 encodes the same
    return "dsv32"


def _model_dir(args: argparse.Namespace) -> str:
    from dsv32.core.demo import trained_demo_path

    if args.model is not None:
        if not os.path.isfile(os.path.join(args.model, "config.json")):
            hint = (f"; dsv32 does not download checkpoints: fetch it first (e.g. `huggingface-cli download "
                    f"{args.model} --local-dir DIR`) and pass --model DIR") if not os.path.exists(args.model) else ""
            raise FlagError(f"--model {args.model}: no config.json in that directory{hint}")
        return args.model
    model = trained_demo_path()
    # the demo shows reasoning and tool calls: its parsers are on unless the user chose otherwise
    args.reasoning_parser = args.reasoning_parser or "deepseek-v3"
    args.tool_call_parser = args.tool_call_parser or "deepseekv32"
    log.info("no --model given: serving the built-in trained demo model from %s (reasoning parser %s, tool-call "
             "parser %s)", model, args.reasoning_parser, args.tool_call_parser)
    return model


def _checked_config(args: argparse.Namespace):
    """The EngineConfig, with every flag problem found before any process starts (FlagError)."""
    from dsv32.core.config import ModelConfig
    from dsv32.core.engine.build import resolve

    check_unsupported(args)
    model = _model_dir(args)
    cfg = ModelConfig.from_pretrained(model)
    if args.quantization == "fp8" and cfg.quant is None:
        raise FlagError("--quantization fp8: this checkpoint's config.json has no FP8 quantization_config")
    kind = cfg.fp4.fmt if cfg.fp4 else "fp8" if cfg.quant else "unquantized"
    for flags, want, where in ((("modelopt_fp4", "modelopt"), "nvfp4", "a ModelOpt NVFP4 quantization_config or "
                                "hf_quant_config.json"), (("quark", "mxfp4"), "mxfp4", "a Quark quantization_config")):
        if args.quantization in flags and kind != want:
            raise FlagError(f"--quantization {args.quantization}: this checkpoint is {kind}, not {want.upper()} "
                            f"(it needs {where})")
    if args.quantization in ("modelslim", "ascend") and not cfg.modelslim:
        raise FlagError(f"--quantization {args.quantization}: this checkpoint has no quant_model_description.json "
                        "(msModelSlim's W8A8 description)")
    if args.trust_remote_code:
        log.info("--trust-remote-code: accepted; dsv32 runs no checkpoint code, so it changes nothing")
    if args.tokenizer_path is not None and not os.path.isfile(os.path.join(args.tokenizer_path, "tokenizer.json")):
        raise FlagError(f"--tokenizer-path {args.tokenizer_path}: no tokenizer.json there")
    template = _auto_chat_template(args, model)
    if args.chat_template and template != args.chat_template:
        log.info("--chat-template %s: SGLang's template for this family; dsv32's built-in '%s' encoder renders the "
                 "same prompts", args.chat_template, template)
    try:  # a template that cannot be read fails now, not at the first chat request
        from dsv32.server.encoding import get_chat_encoder

        get_chat_encoder(template)
    except ValueError as e:
        raise FlagError(f"--chat-template {args.chat_template}: {e}") from None
    if args.enable_cache_report:
        log.info("--enable-cache-report: cached prompt tokens are always in usage.prompt_tokens_details")
    config = engine_config(args, model)
    try:
        resolve(config, cfg)
    except ValueError as e:
        raise FlagError(str(e)) from None
    return config


def build_server(args: argparse.Namespace, on_failure=None):
    """Start the engine's rank processes and build the app. Returns (app, engine_client)."""
    from dsv32.server.app import ServerConfig, ServerState, create_app
    from dsv32.server.engine_process import EngineClient
    from dsv32.server.protocol import load_generation_defaults

    config = _checked_config(args)
    model = config.model
    engine = EngineClient(config, on_failure, stream_interval=args.stream_interval)
    tokenizer = None
    tokenizer_dir = args.tokenizer_path or model
    if os.path.isfile(os.path.join(tokenizer_dir, "tokenizer.json")):
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(os.path.join(tokenizer_dir, "tokenizer.json"))
    state = ServerState(engine, tokenizer, ServerConfig(
        served_model_name=args.served_model_name or (args.model or "dsv32-demo"), model_path=model,
        api_key=args.api_key, enable_metrics=args.enable_metrics, log_requests=args.log_requests,
        reasoning_parser=args.reasoning_parser, tool_call_parser=args.tool_call_parser,
        chat_template=_auto_chat_template(args, model), gen_defaults=load_generation_defaults(model),
        allow_special_tokens_in_messages=args.allow_special_tokens_in_messages, health_timeout_s=args.health_timeout,
        allow_auto_truncate=args.allow_auto_truncate, tokenizer_workers=args.tokenizer_worker_num,
        collect_tokens_histogram=args.collect_tokens_histogram, tokenizer_path=tokenizer_dir,
        grammar_backend=args.grammar_backend,
        server_args=server_args(args, model)))
    return create_app(state), engine


def server_args(args: argparse.Namespace, model: str) -> dict:
    """The settings as /server_info shows them (SGLang's field names; the API key never shown)."""
    out = {k: v for k, v in vars(args).items() if isinstance(v, (str, int, float, bool, type(None)))}
    out.update(model_path=model, tokenizer_path=args.tokenizer_path or model, api_key=None if args.api_key is None
               else "<set>", tp_size=args.tp, dp_size=args.dp, ep_size=args.ep)
    return out


def warm_up(state) -> None:
    """SGLang's warm-up: 8 greedy tokens of "The capital city of France is" before the server says it is ready (the
    first request does not pay for lazy initialisation; a server that cannot generate stops here)."""
    import asyncio

    from dsv32.core.sampling import SamplingParams

    ids = state.tokenizer.encode("The capital city of France is", add_special_tokens=False).ids if state.tokenizer \
        else [0]

    async def run():
        async for out in state.engine.generate(state.engine.new_request_id("warmup"), ids,
                                               SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)):
            if out.error:
                raise RuntimeError(out.error)

    t0 = time.monotonic()
    asyncio.run(run())
    log.info("warm-up generation done in %.2f s (--skip-server-warmup skips it)", time.monotonic() - t0)


def _serve_other_node(args: argparse.Namespace) -> int:
    """--node-rank > 0: this node runs its ranks only (node 0 serves HTTP) until they stop or one fails."""
    import time

    from dsv32.core.engine.launcher import RankFailure, RankProcesses

    config = _checked_config(args)
    try:
        ranks = RankProcesses(config, logging.getLogger().level)
    except RankFailure as e:
        print(f"error: {as_flags(e)}", file=sys.stderr)
        return 2
    p = config.parallel
    print(f"[dsv32] node {p.node_rank}: ranks {ranks.ranks[0]}-{ranks.ranks[-1]} running; node 0 serves HTTP",
          file=sys.stderr, flush=True)
    try:
        while any(proc.is_alive() for proc in ranks.procs):
            failure = ranks.check()
            if failure and not all(proc.exitcode == 0 for proc in ranks.procs if not proc.is_alive()):
                print(f"error: {as_flags(failure)}", file=sys.stderr)
                return 1
            time.sleep(0.5)
    finally:
        ranks.shutdown()
    return 0


# EngineConfig settings whose serve flag is named differently (engine errors name the setting; the server says the flag)
SETTING_FLAGS = {"graph_max_bs": "--cuda-graph-max-bs", "disable_graphs": "--disable-cuda-graph",
                 "chunked_prefill_size": "--chunked-prefill-size", "max_model_len": "--context-length",
                 "num_kv_pages": "--num-kv-pages / --max-total-tokens"}


def as_flags(message: str) -> str:
    """An engine error's setting names as the serve flags that set them."""
    import re

    return re.sub(r"\b(" + "|".join(SETTING_FLAGS) + r")\b", lambda m: SETTING_FLAGS[m.group(1)], str(message))


def serve(args: argparse.Namespace) -> int:
    from dsv32.server.engine_process import EngineDead
    from dsv32.server.http import DrainingServer, ListenError, bind

    try:
        if args.node_rank > 0:
            return _serve_other_node(args)
        sock = bind(args.host, args.port)  # before anything slow: a busy port fails now, not after loading
        server = None

        def stop_serving(message: str) -> None:  # the engine failed: the server exits (non-zero, below)
            if server is not None:
                server.should_exit = True

        app, engine = build_server(args, on_failure=stop_serving)
    except (FlagError, ListenError, EngineDead) as e:
        print(f"error: {as_flags(getattr(e, 'message', e))}", file=sys.stderr)
        return 2
    if not args.skip_server_warmup:
        try:
            warm_up(app.state.dsv32)
        except Exception as e:  # noqa: BLE001 - a server that cannot generate must not announce itself
            print(f"error: the warm-up generation failed: {as_flags(getattr(e, 'message', e))}", file=sys.stderr)
            engine.shutdown()
            return 1
    info = engine.info
    ranks = f", {info['world_size']} ranks" if info["world_size"] > 1 else ""
    print(f"[dsv32] serving {app.state.dsv32.cfg.served_model_name} on http://{args.host}:{args.port} "
          f"(backend {info['backend']} on {info['device']}{ranks}, context {info['max_model_len']}, "
          f"{info['num_kv_pages']} KV pages of {info['page_size']})", file=sys.stderr, flush=True)
    server = DrainingServer(app, sock, app.state.dsv32, engine, args.graceful_shutdown_timeout)
    if engine.failure:  # failed before the server object existed
        server.should_exit = True
    try:
        server.serve_forever()
    finally:
        engine.shutdown()
        if app.state.dsv32.tokens is not None:
            app.state.dsv32.tokens.close()
    if engine.failure:
        print(f"error: the engine failed, so the server stopped: {as_flags(engine.failure)}", file=sys.stderr, flush=True)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="dsv32 serve", description="OpenAI-compatible server for DeepSeek-V3.2 "
                                "(SGLang's flag names).")
    add_serve_args(p)
    args = p.parse_args(argv)
    logging.basicConfig(level=getattr(logging, args.log_level.upper()), format="[dsv32] %(message)s", stream=sys.stderr)
    return serve(args)

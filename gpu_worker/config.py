"""The GPU worker's settings: environment variables (the seed's names), each with a matching flag."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

from gpu_worker.decisions.policies import DEFAULT, POLICY_ALIASES, POLICY_NAMES, STEP, canonical_policy
from gpu_worker.decisions.sizes import AUTO, parse_sizes
from imagegen import protocol
from imagegen.bounds import WIRE
from imagegen.keys import load_public, load_secret
from imagegen.logs import log_format_setting, log_level_setting
from imagegen.settings import parse_optional_int, parse_optional_str, require, setting, state_dir_setting
from imagegen.sockets import CurveClientKeys

PER_SIZE = "per-size"
DYNAMIC = "dynamic"
SIZE_COMPILATIONS = (PER_SIZE, DYNAMIC)


@dataclass(frozen=True)
class WorkerSettings:
    """python -m gpu_worker: load a diffusion pipeline on one GPU and serve batches for the broker."""

    broker_address: str = setting("BROKER_WORKER_ADDRESS", "tcp://127.0.0.1:5556",
                                  "the broker's worker endpoint (another host's address for a remote worker)")
    model_id: str = setting("MODEL_ID", "tiny",
                            "tiny, tiny-sdxl, sd15 or sdxl (random-weight architectures: no download), a local folder "
                            "written by save_pretrained, or a Hugging Face hub id (downloaded on first start into "
                            "HF_HOME's cache)")
    enable_batching: bool = setting("ENABLE_BATCHING", True,
                                    "false: one request per inference, no waiting")
    max_batch_size: int | None = setting("MAX_BATCH_SIZE", None,
                                         "requests per batch; unset: auto-detected from free GPU memory "
                                         "(4 on CPU)", parse=parse_optional_int)
    max_batch_wait_s: float = setting("MAX_BATCH_WAIT_TIME", 5.0,
                                      "seconds the oldest request of a group waits for batch-mates under "
                                      "BATCH_POLICY=window; "
                                      "under the default policy, the longest any hold may last")
    min_batch_size: int = setting("MIN_BATCH_SIZE", 1,
                                  "a group smaller than this waits the full MAX_BATCH_WAIT_TIME")
    min_batch_wait_s: float = setting("MIN_BATCH_WAIT_TIME", 0.5,
                                      "the shortest window adaptive batching shrinks to "
                                      "(capped at MAX_BATCH_WAIT_TIME)")
    adaptive_batching: bool = setting("ENABLE_ADAPTIVE_BATCHING", True,
                                      "shorten the window when the queue is deep")
    adaptive_threshold: int = setting("ADAPTIVE_BATCH_THRESHOLD", 10,
                                      "queue depth at which adaptive batching starts shortening the window")
    batch_policy: str = setting("BATCH_POLICY", DEFAULT,
                                "run-to-completion: a batch runs as soon as the GPU is free (a lone request at once, "
                                "restarted with a burst that follows it within 20 ms), unless batch-mates are due "
                                "within milliseconds or the measured costs say waiting pays, and runs all its steps; "
                                "window: a group runs when it fills a batch or its oldest request has waited the "
                                "window (MAX_BATCH_WAIT_TIME, adaptive), see docs/batching.md; default and seed: the "
                                "earlier names of run-to-completion and window, still accepted; step: decisions per "
                                "denoising step (docs/scheduling.md): rows of one size with different steps or "
                                "guidance share each step, newcomers join at step boundaries, a cancelled row leaves "
                                "at the next one; needs a real model (not MODEL_ID=fake); no out-of-memory splitting, "
                                "and with TORCH_COMPILE only the first size is warmed",
                                parse=lambda text: canonical_policy(text.strip()))
    max_in_flight: int | None = setting("WORKER_MAX_IN_FLIGHT", None,
                                        "requests the broker may hand this worker at once; "
                                        "unset: 2 x MAX_BATCH_SIZE (one batch running, one forming)",
                                        parse=parse_optional_int)
    gpu_id: int | None = setting("GPU_ID", None,
                                 "GPU id reported in stats; unset: the first entry of CUDA_VISIBLE_DEVICES (the "
                                 "launcher sets both to the worker's GPU)",
                                 parse=parse_optional_int)
    worker_name: str | None = setting("WORKER_NAME", None, "unique worker name; unset: HOST-gpuN",
                                      parse=parse_optional_str)
    host: str | None = setting("WORKER_HOST", None, "host name reported in stats; unset: this machine's",
                               parse=parse_optional_str)
    device: str | None = setting("DEVICE", None, "torch device; unset: cuda if available, else cpu",
                                 parse=parse_optional_str)
    dtype: str | None = setting("DTYPE", None,
                                "bfloat16, float16 or float32; unset: bfloat16 on CUDA (float16 where the GPU lacks "
                                "bfloat16), float32 on CPU",
                                parse=parse_optional_str)
    heartbeat_interval_s: float = setting("HEARTBEAT_INTERVAL_S", 1.0,
                                          "seconds between heartbeats (the broker's WELCOME may override it)")
    heartbeat_liveness: int = setting("HEARTBEAT_LIVENESS", 5,
                                      "broker heartbeats the worker may miss before it reconnects on a fresh socket "
                                      "and registers again")
    curve_secret_key: str | None = setting("WORKER_CURVE_SECRET_KEY", None,
                                           "this worker's .key_secret file (python -m imagegen.keys worker NAME DIR); "
                                           "set when the broker requires CurveZMQ", parse=parse_optional_str)
    broker_public_key: str | None = setting("BROKER_CURVE_PUBLIC_KEY", None,
                                            "the broker's public broker.key file (with WORKER_CURVE_SECRET_KEY)",
                                            parse=parse_optional_str)
    warmup: bool = setting("WORKER_WARMUP", True,
                           "generate (2 steps) at the model's native resolution (with TORCH_COMPILE: the first of "
                           "SIZES) before registering, at every batch "
                           "size, so no request pays for first-call setup or compiling: the largest first, or the "
                           "smallest first when MAX_BATCH_SIZE is at most CUDA_GRAPH_MAX_BATCH with TORCH_COMPILE "
                           "(the CUDA graphs' one compilation is then made for a lone request's batch). With "
                           "TORCH_COMPILE this also compiles and records the CUDA graphs; an auto-detected "
                           "MAX_BATCH_SIZE that runs out of memory here is halved until it fits. SD-1.5 on an "
                           "H100: about 70 s for its 64 sizes, plus compiling")
    torch_compile: bool = setting("TORCH_COMPILE", False,
                                  "compile the UNet, the VAE decoder and the text encoders with torch.compile at "
                                  "start (with channels_last and fused QKV projections). One compilation serves a "
                                  "range of batch sizes (dynamic batch dimension) at each size SIZES lists; the "
                                  "first size is warmed up before the worker registers, the others in the "
                                  "background, and recompiling is forbidden outside a warm-up, so compile time never "
                                  "lands in a request; a size not warm (yet) runs eager. On an "
                                  "H100: SDXL 1.17x and SD-1.5 1.35x faster at full batches, a lone request 6% "
                                  "(SD-1.5) and 11% (SDXL) faster (docs/benchmarks.md). The first start on a "
                                  "machine takes minutes (on an H200: SD-1.5 7.6 min for its 64 batch sizes on a "
                                  "cold cache, SDXL 6.6 min for its 41); the result is cached in STATE_DIR/compile-cache "
                                  "(TORCHINDUCTOR_CACHE_DIR overrides it), so restarts compile in seconds")
    cuda_graph_max_batch: int = setting("CUDA_GRAPH_MAX_BATCH", 2,
                                        "with TORCH_COMPILE on a GPU: batches of up to this many images replay "
                                        "CUDA graphs (mode=reduce-overhead), which removes the kernel-launch cost "
                                        "that dominates a lone request; 0: none")
    sizes: str = setting("SIZES", AUTO,
                         "image sizes served at compiled speed with TORCH_COMPILE, as WIDTHxHEIGHT,... ; auto: the "
                         "architecture's standard aspect-ratio buckets (SDXL: 1024x1024, 1152x896, 896x1152, "
                         "1216x832, 832x1216, 1344x768, 768x1344, 1536x640, 640x1536; SD-1.5: 512x512, 512x768, "
                         "768x512, 576x448, 448x576), scaled to a model of another native size. The first (the "
                         "native square when listed) is warmed before the worker registers, the others in the "
                         "background between batches (WARM_UP_MAX_DEFER_S)")
    unlisted_size: str = setting("UNLISTED_SIZE", "eager",
                                 "a request of a size SIZES does not list: eager (run it uncompiled, counted in "
                                 "/stats as eager_batches), refuse (400 size_not_served, listing the sizes) or "
                                 "snap (draw it at the listed size nearest in aspect ratio, then area)")
    size_compilation: str = setting("SIZE_COMPILATION", PER_SIZE,
                                    "with TORCH_COMPILE: per-size (one compilation per listed size, each "
                                    "specialised to its shape) or dynamic (height and width symbolic: one "
                                    "compilation shared by every size, kernels not specialised to any)")
    warm_up_max_defer_s: float = setting("WARM_UP_MAX_DEFER_S", 30.0,
                                         "with TORCH_COMPILE, sizes not yet warm are warmed a unit (one batch "
                                         "size of one size) at a time whenever the queue is empty, and at least "
                                         "one unit this often under steady traffic")
    preview_every_steps: int = setting("PREVIEW_EVERY_STEPS", 5,
                                       "a request that asks for previews (preview: true) gets a small image of its "
                                       "latents after every this many denoising steps (never the last): a linear "
                                       "latent-to-RGB map at 1/8 of the image's side, no VAE decode, computed on the "
                                       "GPU for the batch's rows that asked, in one matrix product "
                                       "(gpu_worker/model/previews.py)")
    state_dir: str = state_dir_setting()
    log_level: str = log_level_setting()
    log_format: str = log_format_setting()

    def validate(self) -> None:
        # The upper bounds are the protocol's: the broker drops a registration beyond them as
        # malformed, and the worker would try again and again without ever serving.
        require(self.max_batch_size is None or 1 <= self.max_batch_size <= protocol.MAX_BATCH_IMAGES,
                "MAX_BATCH_SIZE", f"must be between 1 and {protocol.MAX_BATCH_IMAGES}")
        for env, seconds in (("MAX_BATCH_WAIT_TIME", self.max_batch_wait_s), ("MIN_BATCH_WAIT_TIME", self.min_batch_wait_s)):
            require(0 <= seconds <= protocol.MAX_BATCH_WAIT_S, env, f"must be between 0 and {protocol.MAX_BATCH_WAIT_S:g}")
        require(1 <= self.min_batch_size <= protocol.MAX_BATCH_IMAGES, "MIN_BATCH_SIZE",
                f"must be between 1 and {protocol.MAX_BATCH_IMAGES}")
        require(self.max_batch_size is None or self.min_batch_size <= self.max_batch_size, "MIN_BATCH_SIZE",
                "must not exceed MAX_BATCH_SIZE")
        require(1 <= self.adaptive_threshold <= protocol.MAX_ADAPTIVE_THRESHOLD, "ADAPTIVE_BATCH_THRESHOLD",
                f"must be between 1 and {protocol.MAX_ADAPTIVE_THRESHOLD}")
        require(self.batch_policy in POLICY_NAMES + (STEP,), "BATCH_POLICY",
                f"must be one of {', '.join(POLICY_NAMES + (STEP,) + tuple(POLICY_ALIASES))}")
        require(self.max_in_flight is None or 1 <= self.max_in_flight <= protocol.MAX_CAPACITY, "WORKER_MAX_IN_FLIGHT",
                f"must be between 1 and {protocol.MAX_CAPACITY}")
        require(self.gpu_id is None or -1 <= self.gpu_id <= protocol.MAX_GPU_ID, "GPU_ID",
                f"must be between -1 (a CPU worker) and {protocol.MAX_GPU_ID}")
        for env, text, most in (("WORKER_NAME", self.worker_name, protocol.MAX_ID_CHARS),
                                ("WORKER_HOST", self.host, protocol.MAX_HOST_CHARS),
                                ("MODEL_ID", self.model_id, protocol.MAX_MODEL_ID_CHARS)):
            require(text is None or len(text) <= most, env, f"must be at most {most} characters")
        try:
            parse_sizes(self.sizes)
        except ValueError as exc:
            require(False, "SIZES", str(exc))
        require(self.unlisted_size in protocol.UNLISTED_SIZE_RULES, "UNLISTED_SIZE",
                f"must be one of {', '.join(protocol.UNLISTED_SIZE_RULES)}")
        require(self.size_compilation in SIZE_COMPILATIONS, "SIZE_COMPILATION",
                f"must be one of {', '.join(SIZE_COMPILATIONS)}")
        require(self.warm_up_max_defer_s > 0, "WARM_UP_MAX_DEFER_S", "must be positive")
        require(self.cuda_graph_max_batch >= 0, "CUDA_GRAPH_MAX_BATCH", "must not be negative")
        require(1 <= self.preview_every_steps <= WIRE.inference_steps.high, "PREVIEW_EVERY_STEPS",
                f"must be between 1 and {WIRE.inference_steps.high}")
        require(self.heartbeat_interval_s > 0, "HEARTBEAT_INTERVAL_S", "must be positive")
        require(self.heartbeat_liveness >= 1, "HEARTBEAT_LIVENESS", "must be at least 1")
        require((self.curve_secret_key is None) == (self.broker_public_key is None), "WORKER_CURVE_SECRET_KEY",
                "set it together with BROKER_CURVE_PUBLIC_KEY, or neither")
        for env, path in (("WORKER_CURVE_SECRET_KEY", self.curve_secret_key),
                          ("BROKER_CURVE_PUBLIC_KEY", self.broker_public_key)):
            require(path is None or os.path.exists(path), env, f"{path} does not exist")

    def resolved_gpu_id(self, cuda_available: bool) -> int:
        if self.gpu_id is not None:
            return self.gpu_id
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")[0].strip()
        if visible.isdigit():
            return int(visible)
        return 0 if cuda_available else -1

    def curve_keys(self) -> CurveClientKeys | None:
        if self.curve_secret_key is None or self.broker_public_key is None:
            return None
        public, secret = load_secret(self.curve_secret_key)
        return CurveClientKeys(public, secret, load_public(self.broker_public_key))

    def resolved_host(self) -> str:
        return self.host or socket.gethostname()

"""python -m launcher.supervisor_config: write a supervisord config with one worker per GPU of this host.

``scripts/serve.sh`` runs this before supervisord, so nobody edits ``numprocs``::

    python -m launcher.supervisor_config                    # -> run/supervisord.conf: broker, gateway, workers
    python -m launcher.supervisor_config --workers-only     # a GPU host serving a broker elsewhere
    python -m launcher.supervisor_config --no-workers       # broker and gateway only (GPUs elsewhere)
    GPU_IDS=0,2 python -m launcher.supervisor_config        # only GPUs 0 and 2
    GPU_MODEL_IDS="0=model-a;1=model-b" python -m launcher.supervisor_config   # two models, one host

The template is the repo's ``supervisord.conf`` (still usable by itself: one worker per process
number). Its ``[program:gpu_worker]`` section is replaced by one ``[program:gpu_worker_<id>]`` per
GPU, with the same options, in a ``[group:gpu_worker]``; so supervisorctl names stay
``gpu_worker:gpu_worker_<id>``, ``gpu_worker:*`` addresses them all and logs stay
``run/logs/gpu_worker_<id>.log``. Each worker gets ``CUDA_VISIBLE_DEVICES=<id>``,
``CUDA_DEVICE_ORDER=PCI_BUS_ID`` and ``GPU_ID=<id>`` (physical ids: :mod:`launcher.gpus`).
Without a GPU the one worker is ``gpu_worker_cpu``, with every GPU hidden from it. With
GPU_MODEL_IDS a worker named there gets its own ``MODEL_ID`` (the others keep the environment's),
so one host serves several models (docs/scale-out.md, "Several models in one cluster").

:func:`render` is pure (template text in, config text out); :func:`main` reads the environment,
asks NVML how many GPUs there are, and writes the file.
"""

from __future__ import annotations

import argparse
import configparser
import io
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from launcher.gpus import GpuSelectionError, nvml_device_count, resolve_gpu_ids
from imagegen import settings as settings_lib
from imagegen.settings import SettingsError, parse_optional_str, setting

REPO = Path(__file__).resolve().parent.parent
WORKER_PROGRAM = "gpu_worker"
TEMPLATE_NAME = "supervisord.conf"
SERVICE_PROGRAMS = ("broker", "gateway")  # left out with --workers-only
# numprocs options that make no sense for one program per GPU
_NUMPROCS_OPTIONS = ("numprocs", "numprocs_start", "process_name")
_PER_PROCESS_NAME = "%(program_name)s_%(process_num)d"


def parse_model_ids(text: str) -> dict[str, str]:
    """``GPU=MODEL_ID`` pairs separated by ``;`` (a model id may hold commas: ``fake:delay=1,fail=1``)
    -> {"0": "model-a", "cpu": ...}; the key is a physical GPU id, or ``cpu`` for the CPU worker."""
    pairs: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in text.split(";"))):
        key, equals, model_id = part.partition("=")
        key, model_id = key.strip(), model_id.strip()
        if not equals or not model_id or not (key.isdigit() or key == "cpu"):
            raise ValueError(f"expected GPU=MODEL_ID pairs separated by ';' (e.g. 0=model-a;1=model-b), got {part!r}")
        if key in pairs:
            raise ValueError(f"GPU {key} is given two models")
        pairs[str(int(key)) if key.isdigit() else key] = model_id
    return pairs


@dataclass(frozen=True)
class LauncherSettings:
    """python -m launcher.supervisor_config: write a supervisord config with one worker per GPU."""

    gpu_ids: str | None = setting("GPU_IDS", None,
                                  "physical GPU ids (nvidia-smi numbering) to run one worker each on, e.g. 0,2; "
                                  "unset: every GPU NVML finds (within CUDA_VISIBLE_DEVICES if set); "
                                  "cpu: one CPU worker. No GPU at all: one CPU worker",
                                  parse=parse_optional_str)
    model_ids: dict[str, str] | None = setting(
        "GPU_MODEL_IDS", None,
        "a model per GPU, to serve several models from one host: GPU=MODEL_ID pairs separated by ';', "
        "e.g. 0=stabilityai/sdxl-turbo;1=runwayml/stable-diffusion-v1-5 (cpu= for the CPU worker). A worker "
        "not named keeps MODEL_ID; every GPU named must get a worker. The broker routes each request to the "
        "workers of its model (the request's model field)",
        parse=parse_model_ids)


@dataclass(frozen=True)
class WorkerSlot:
    """One worker program: the physical GPU it owns, or None for the CPU worker."""

    gpu_id: int | None

    @property
    def label(self) -> str:
        """The GPU's id, or ``cpu``: how GPU_MODEL_IDS and the program name call this slot."""
        return "cpu" if self.gpu_id is None else str(self.gpu_id)

    @property
    def program(self) -> str:
        return f"{WORKER_PROGRAM}_{self.label}"

    def environment(self) -> dict[str, str]:
        if self.gpu_id is None:
            return {"CUDA_VISIBLE_DEVICES": ""}  # GPU_IDS=cpu on a GPU host: keep the GPUs out of reach
        gpu = str(self.gpu_id)
        return {"CUDA_VISIBLE_DEVICES": gpu, "CUDA_DEVICE_ORDER": "PCI_BUS_ID", "GPU_ID": gpu}


def worker_slots(gpu_ids: list[int]) -> list[WorkerSlot]:
    """One slot per GPU; a single CPU slot when there is none."""
    return [WorkerSlot(i) for i in gpu_ids] or [WorkerSlot(None)]


def _parse_environment(text: str) -> dict[str, str]:
    """supervisord's environment=KEY="value",KEY2="value2" syntax (its own parser)."""
    from supervisor.datatypes import dict_of_key_value_pairs

    return dict_of_key_value_pairs(text) if text.strip() else {}


def _format_environment(env: dict[str, str]) -> str:
    def quote(value: str) -> str:
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'

    return ",".join(f"{key}={quote(value)}" for key, value in env.items())


def _read(template_text: str) -> configparser.RawConfigParser:
    # The same dialect supervisord reads: ';'/'#' comments, no interpolation, duplicate keys tolerated.
    parser = configparser.RawConfigParser(inline_comment_prefixes=(";", "#"), strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment, method-assign]
    parser.read_string(template_text)
    return parser


def _worker_section(template: dict[str, str], slot: WorkerSlot, model_id: str | None = None) -> dict[str, str]:
    options = {k: v.replace(_PER_PROCESS_NAME, "%(program_name)s") for k, v in template.items()
               if k not in _NUMPROCS_OPTIONS}
    environment = _parse_environment(template.get("environment", ""))
    environment.pop("GPU_ID", None)
    environment.update(slot.environment())
    if model_id is not None:
        environment["MODEL_ID"] = model_id
    options["environment"] = _format_environment(environment)
    return options


def render(template_text: str, here: Path, gpu_ids: list[int], workers_only: bool = False,
           no_workers: bool = False, model_ids: dict[str, str] | None = None) -> str:
    """The config for ``gpu_ids`` (empty: one CPU worker), built from the template's text.

    ``here`` replaces ``%(here)s`` (the template's folder), so the written file may live elsewhere.
    ``workers_only`` leaves out broker and gateway; ``no_workers`` leaves out the workers;
    ``model_ids`` (GPU_MODEL_IDS: a slot's label -> MODEL_ID) sets the model of the workers it names."""
    model_ids = model_ids or {}
    source = _read(template_text.replace("%(here)s", str(here).replace("%", "%%")))
    program = f"program:{WORKER_PROGRAM}"
    if not source.has_section(program):
        raise ValueError(f"the template has no [{program}] section to copy the workers' options from")
    worker_template = dict(source.items(program))
    out = configparser.RawConfigParser(interpolation=None)
    out.optionxform = str  # type: ignore[assignment, method-assign]
    slots = worker_slots(gpu_ids)
    for section in source.sections():
        if workers_only and section in {f"program:{name}" for name in SERVICE_PROGRAMS}:
            continue
        if section != program:
            out[section] = dict(source.items(section))
            continue
        if no_workers:
            continue
        for slot in slots:
            out[f"program:{slot.program}"] = _worker_section(worker_template, slot, model_ids.get(slot.label))
        out[f"group:{WORKER_PROGRAM}"] = {
            "programs": ",".join(slot.program for slot in slots),
            "priority": worker_template.get("priority", "999"),
        }
    buffer = io.StringIO()
    out.write(buffer)
    gpus = ",".join(str(s.gpu_id) for s in slots if s.gpu_id is not None) or "none (one CPU worker)"
    gpus = "none (no workers: they run on other hosts)" if no_workers else gpus
    models = "".join(f"; {slot.program}: MODEL_ID={model_ids[slot.label]}\n" for slot in slots
                     if slot.label in model_ids and not no_workers)
    header = (f"; GENERATED by python -m launcher.supervisor_config from {TEMPLATE_NAME}: do not edit.\n"
              f"; GPUs: {gpus}{'; workers only (the broker runs elsewhere)' if workers_only else ''}\n"
              f"{models}\n")
    return header + buffer.getvalue()


def _arguments(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """(the launcher's own flags, the argv left for LauncherSettings)."""
    parser = argparse.ArgumentParser(prog="python -m launcher.supervisor_config", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--template", type=Path, default=REPO / TEMPLATE_NAME,
                        help="supervisord config to copy (default: the repo's supervisord.conf)")
    parser.add_argument("--output", type=Path, default=REPO / "run" / "supervisord.conf",
                        help="where to write the config (default: run/supervisord.conf)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--workers-only", action="store_true",
                      help="only the GPU workers (a GPU host for a broker elsewhere: set BROKER_WORKER_ADDRESS)")
    mode.add_argument("--no-workers", action="store_true",
                      help="only broker and gateway (a broker host whose workers all run on other hosts)")
    parser.add_argument("--assume-gpu-count", type=int, default=None,
                        help="use this GPU count instead of asking NVML (dry runs and tests)")
    settings_lib.add_arguments(parser, LauncherSettings)
    args = parser.parse_args(argv)
    rest = [] if args.gpu_ids is None else ["--gpu-ids", args.gpu_ids]
    return args, rest + ([] if args.model_ids is None else ["--gpu-model-ids", args.model_ids])


def main(argv: list[str], environ: dict[str, str] | os._Environ = os.environ) -> int:
    args, rest = _arguments(argv)
    try:
        settings = settings_lib.load(LauncherSettings, rest, environ)
        count = args.assume_gpu_count if args.assume_gpu_count is not None else nvml_device_count()
        gpu_ids = resolve_gpu_ids(settings.gpu_ids, environ.get("CUDA_VISIBLE_DEVICES"), count)
        _check_environment(environ, 0 if args.no_workers else len(worker_slots(gpu_ids)), args.workers_only)
        _check_model_ids(settings.model_ids or {}, [] if args.no_workers else worker_slots(gpu_ids))
    except (SettingsError, GpuSelectionError) as exc:
        print(f"supervisor_config: configuration error: {exc}", file=sys.stderr)
        return 2
    text = render(args.template.read_text(), args.template.resolve().parent, gpu_ids, args.workers_only,
                  args.no_workers, settings.model_ids)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text)
    # The config logs under <template folder>/run/logs; supervisord refuses to start without it.
    (args.template.resolve().parent / "run" / "logs").mkdir(parents=True, exist_ok=True)
    what = f"GPU {','.join(map(str, gpu_ids))}" if gpu_ids else "no GPU found: one CPU worker"
    workers = 0 if args.no_workers else len(worker_slots(gpu_ids))
    print(f"supervisor_config: {workers} worker(s) ({'--no-workers' if args.no_workers else what}; "
          f"NVML counts {count}) -> {args.output}", file=sys.stderr)
    return 0


def _check_model_ids(model_ids: dict[str, str], slots: list[WorkerSlot]) -> None:
    """Every GPU that GPU_MODEL_IDS names must get a worker here: a typo must not leave a model unserved."""
    labels = [slot.label for slot in slots]
    missing = sorted(set(model_ids) - set(labels))
    if missing:
        raise SettingsError(f"GPU_MODEL_IDS names {', '.join(missing)}, which get no worker here "
                            f"(workers: {', '.join(labels) or 'none'})")


def _check_environment(environ, workers: int, workers_only: bool) -> None:
    """Settings that would make the generated config misbehave, refused before anything starts."""
    if workers > 1 and environ.get("WORKER_NAME"):
        raise SettingsError(f"WORKER_NAME is set, but {workers} workers would register under that one name; "
                            f"unset it (each worker is then named WORKER_HOST-gpu<id>)")
    if workers_only and not environ.get("BROKER_WORKER_ADDRESS"):
        raise SettingsError("--workers-only needs BROKER_WORKER_ADDRESS, the broker host's worker endpoint "
                            "(e.g. tcp://broker-host:5556)")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""`vilms validate | render | retag | serve | compose | weights | plan | schema`: the operator's entry points."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import MutableMapping
from typing import Any

from vilms.config.model import CONFIG_ENV, Config, ConfigError
from vilms.config.load import build_config, read_yaml
from vilms.config.schema import ConfigIssue


def _issues_for(path: str) -> tuple[list[ConfigIssue], list[ConfigIssue]]:
    """(errors, warnings) for the config at `path`."""
    from vilms.config.routing import semantic_issues

    try:
        config = build_config(read_yaml(path), source=path)
    except ConfigError as exc:
        return exc.issues, []
    warnings = list(config.notes) + [i for i in semantic_issues(config) if i.severity == "warning"]
    return [], warnings + _render_refusals(config)


def _render_refusals(config: Config) -> list[ConfigIssue]:
    """Deploy-time rules `vilms render` enforces, said at validate already (as warnings: serving it is fine)."""
    from vilms.config.keys import exposure_issues

    return [ConfigIssue(i.pointer, f"vilms render refuses this config: {i.message}", i.hint, severity="warning")
            for i in exposure_issues(config, bind=config.docker["gateway-bind"]) if i.severity == "error"]


def cmd_validate(args: argparse.Namespace) -> int:
    errors, warnings = _issues_for(args.config)
    if args.format == "json":
        print(json.dumps({"valid": not errors, "errors": [i.as_dict() for i in errors],
                          "warnings": [i.as_dict() for i in warnings]}, indent=2))
    else:
        for issue in errors + warnings:
            print(f"{args.config}: {issue.render()}", file=sys.stderr if issue.severity == "error" else sys.stdout)
        if not errors:
            print(f"{args.config}: valid")
    return 1 if errors else 0


def cmd_render_many(args: argparse.Namespace) -> int:
    """Every host of a --many file in one process; nothing is written unless every host is valid."""
    from pathlib import Path

    from vilms.deploy.many import render_many, write_many

    try:  # JSON by json: PyYAML decodes the \\ud83d\\ude00 pairs Ansible's to_json writes into lone surrogates
        with open(args.many, encoding="utf-8") as fh:
            text = fh.read()
        spec = json.loads(text) if text.lstrip().startswith("{") else read_yaml(args.many)
    except (OSError, ValueError) as exc:
        print(f"vilms render: {args.many}: {exc}", file=sys.stderr)
        return 1
    except ConfigError as exc:
        print(f"vilms render: {args.many}: {exc}", file=sys.stderr)
        return 1
    result = write_many(render_many(spec, base_dir=Path(args.many).parent), Path(args.out))
    if args.format == "json":
        print(json.dumps(result.as_dict(), indent=2))
    else:
        for host, issues in sorted(result.errors.items()):
            for issue in issues:
                print(f"{host}: {issue.render()}", file=sys.stderr)
        for host, one in sorted(result.renders.items()):
            for issue in one.warnings:
                print(f"{host}: {issue.render()}")
        verdict = (f"{len(result.renders)} host(s) rendered into {args.out}" if result.ok else
                   f"{len(result.errors)} host(s) invalid ({', '.join(sorted(result.errors))}); nothing written")
        print(f"vilms render --many: {verdict}", file=sys.stdout if result.ok else sys.stderr)
    return 0 if result.ok else 1


def cmd_render(args: argparse.Namespace) -> int:
    """Validate once, write config.yaml, docker-compose.yaml, plan.json (and keys.yaml) into --out."""
    from vilms.deploy.plan import render_to

    if args.many:
        return cmd_render_many(args)
    if not args.config:
        print("vilms render: give --config (one host) or --many (every host in one file)", file=sys.stderr)
        return 2

    gpu = {"auto": None, "yes": True, "no": False}[args.gpu]
    try:
        result, changed = render_to(args.config, args.out, gpu=gpu, engine_tag=args.engine_tag)
    except ConfigError as exc:
        if args.format == "json":
            print(json.dumps({"errors": [i.as_dict() for i in exc.issues]}, indent=2))
        else:
            for issue in exc.issues:
                print(f"{args.config}: {issue.render()}", file=sys.stderr)
            print(f"vilms render: {args.config} is invalid; nothing written to {args.out}", file=sys.stderr)
        return 1
    if args.format == "json":
        print(json.dumps({"out": args.out, "files": result.plan["files"] + ["plan.json"], "changed": changed,
                          "warnings": [i.as_dict() for i in result.warnings]}, indent=2))
    else:
        for issue in result.warnings:
            print(f"{args.config}: {issue.render()}")
        print(f"vilms render: {args.out}: {len(changed)} file(s) changed" + (f" ({', '.join(changed)})" if changed else ""))
    return 0


def cmd_retag(args: argparse.Namespace) -> int:
    """Fill the Jetson engine tag into an existing render from its own files (no second validation)."""
    from pathlib import Path

    from vilms.deploy.plan import retag, write_render

    gpu = {"auto": None, "yes": True, "no": False}[args.gpu]
    out = Path(args.out)
    if not (out / "config.yaml").is_file():
        print(f"vilms retag: {out} holds no render (run vilms render first)", file=sys.stderr)
        return 1
    result = retag(out, gpu=gpu, engine_tag=args.engine_tag)
    changed = write_render(result, out)
    if args.format == "json":
        print(json.dumps({"out": args.out, "files": result.plan["files"] + ["plan.json"], "changed": changed}, indent=2))
    else:
        print(f"vilms retag: {out}: {len(changed)} file(s) changed" + (f" ({', '.join(changed)})" if changed else ""))
    return 0


def quiet_openmp(environ: MutableMapping[str, str]) -> None:
    """Let torch's OpenMP threads sleep between forward passes instead of spinning (unless the operator chose).

    By default they spin for a while after each parallel region, taking the CPU the event loop needs to parse the
    next requests and write the last answers: on 2 cores, 256 concurrent one-sentence embedding requests went from
    0.69-0.76 to 0.80-0.81 of a direct encode() with passive waiting, the direct encode itself unchanged (bench/).
    """
    environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from vilms.config.load import load_config
    from vilms.serve.embeddings.process import shared_encoder
    from vilms.serve.observe import setup_logging
    from vilms.serve.server import HeadLimits, protocol
    from vilms.serve.workers import resolve_workers

    path = args.config or os.environ.get(CONFIG_ENV)
    try:
        config = load_config(path)
    except ConfigError as exc:
        print(f"vilms serve: invalid config {path}:\n{exc}", file=sys.stderr)
        return 1
    gw = config.gateway
    setup_logging(args.log_format or gw["log-format"], gw["log-level"])
    quiet_openmp(os.environ)  # before any worker or encoder process imports torch
    workers = args.workers or resolve_workers(gw["workers"], config)
    if gw["workers"] == "auto" and not args.workers:
        logging.getLogger("vilms.gateway").info("gateway.workers auto: %d worker process(es)", workers)
    os.environ[CONFIG_ENV] = os.path.abspath(path)
    if args.log_format:
        os.environ["VILMS_LOG_FORMAT"] = args.log_format
    # httptools behind a guard on the request head (size, field count, deadline): vilms.serve.server
    http = protocol(HeadLimits.from_gateway(gw))
    with shared_encoder(config, workers):  # one encoder process for all workers when several share local models
        # proxy_headers off: nothing reads the client address or scheme that X-Forwarded-* would rewrite, and its
        # middleware ran on every request
        uvicorn.run("vilms.serve.api.factory:app", factory=True, host=args.host or gw["host"], port=args.port or gw["port"],
                    workers=workers, loop="uvloop", http=http, access_log=False, log_level="warning",
                    timeout_keep_alive=30, backlog=4096, proxy_headers=False)
    return 0


def cmd_compose(args: argparse.Namespace) -> int:
    from vilms.deploy.compose import render_compose

    try:
        config = build_config(read_yaml(args.config), source=args.config)
    except ConfigError as exc:
        print(f"vilms compose: invalid config {args.config}:\n{exc}", file=sys.stderr)
        return 1
    if args.models_json:
        from vilms.deploy.compose import compose_context_models

        print(json.dumps(compose_context_models(config)))
        return 0
    gpu = {"auto": None, "yes": True, "no": False}[args.gpu]
    text = render_compose(config, platform=args.platform, gpu=gpu, config_path=args.config_mount)
    if args.output and args.output != "-":
        with open(args.output, "w", encoding="utf-8") as fh:
            fh.write(text)
    else:
        sys.stdout.write(text)
    return 0


def cmd_weights(args: argparse.Namespace) -> int:
    """`vilms weights list|fetch|verify`: the controller side of shipping model weights (vilms.weights)."""
    from vilms.deploy import weights

    if args.weights_command == "verify":
        problems = weights.verify(args.dir, weights.read_manifest(args.manifest))
        for line in problems:
            print(f"{args.dir}: {line}", file=sys.stderr)
        print(json.dumps({"ok": not problems, "problems": problems}))
        return 1 if problems else 0
    if getattr(args, "plan", None):
        with open(args.plan, encoding="utf-8") as fh:
            specs = weights.from_plan(json.load(fh).get("weights") or [])
    else:
        try:
            config = build_config(read_yaml(args.config), source=args.config)
        except ConfigError as exc:
            print(f"vilms weights: invalid config {args.config}:\n{exc}", file=sys.stderr)
            return 1
        specs = weights.weights_for(config)
    if args.weights_command == "list":
        print(json.dumps({"weights": [w.as_dict() for w in specs]}, indent=1))
        return 0
    token = os.environ.get(args.token_env) or None
    try:
        fetched = weights.fetch_specs(specs, args.cache, token=token, endpoint=os.environ.get("HF_ENDPOINT") or None)
    except weights.WeightsError as exc:
        print(json.dumps({"error": str(exc)}))
        print(f"vilms weights fetch: {exc}", file=sys.stderr)
        return 1
    print(json.dumps({"weights": [f.as_dict() for f in fetched]}))
    return 0


def _weights_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("weights", help="model weights the plan ships: list, fetch into the controller cache, verify")
    wsub = p.add_subparsers(dest="weights_command", required=True)
    for name, text in (("list", "every model whose weights vilms ships (source, host dir, container path)"),
                       ("fetch", "fetch each source once into the cache; print the manifests as JSON")):
        w = wsub.add_parser(name, help=text)
        source = w.add_mutually_exclusive_group(required=True)
        source.add_argument("--config", help="a config.yaml")
        source.add_argument("--plan", help="a plan.json written by `vilms render` (its \"weights\")")
    w.add_argument("--cache", default=os.path.expanduser("~/.cache/vilms/weights"))
    w.add_argument("--token-env", default="HF_TOKEN", help="environment variable holding a hub token (gated repos)")
    w = wsub.add_parser("verify", help="check a directory against a manifest (size + sha256 of every file)")
    w.add_argument("dir")
    w.add_argument("--manifest", required=True, help="JSON: {files: [{path, size, sha256}]} or that list")
    p.set_defaults(func=cmd_weights)


def cmd_ollama(args: argparse.Namespace) -> int:
    """`vilms ollama fetch`: the Ollama models of one or more plans into a store-shaped cache on the controller."""
    from vilms.deploy import ollama_store as store

    names = list(args.model or [])
    for path in args.plan or []:
        with open(path, encoding="utf-8") as fh:
            names += store.plan_models(json.load(fh))
    retry = store.Retry(attempts=args.retries, delay=args.retry_delay)
    source = store.StoreSource(args.store) if args.store else store.RegistrySource(args.registry, retry=retry)
    try:
        fetched = store.fetch_models(names, args.cache, source, check=args.check)
    except store.StoreError as exc:
        print(f"vilms ollama fetch: {exc}", file=sys.stderr)
        return 1
    print(json.dumps({"cache": args.cache, "models": [f.as_dict() for f in fetched],
                      "bytes": sum(f.total_bytes for f in fetched),
                      "downloaded": sum(f.downloaded for f in fetched)}, indent=2))
    return 0


def cmd_image(args: argparse.Namespace) -> int:
    """`vilms image platform ARCHIVE... [--machine M]`: each archive's os/arch; exit 1 if one cannot run on M."""
    from vilms.deploy import images

    report, problems = {}, []
    for path in args.archive:
        try:
            report[path] = str(images.archive_platform(path))
            if args.machine and (why := images.mismatch(path, args.machine)):
                problems.append(why)
        except images.ArchiveError as exc:
            problems.append(str(exc))
    for line in problems:
        print(f"vilms image platform: {line}", file=sys.stderr)
    print(json.dumps({"platforms": report, "ok": not problems, "problems": problems}, indent=2))
    return 1 if problems else 0


def _image_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("image", help="what image archives say about themselves (platform)")
    isub = p.add_subparsers(dest="image_command", required=True)
    i = isub.add_parser("platform", help="print each archive's os/architecture; with --machine, refuse a mismatch")
    i.add_argument("archive", nargs="+", help="a `docker save` archive or an OCI layout tar")
    i.add_argument("--machine", help="the host's `uname -m` (ansible_architecture), e.g. aarch64")
    p.set_defaults(func=cmd_image)


def _ollama_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ollama", help="Ollama models fetched once on the controller (store layout) for shipping")
    osub = p.add_subparsers(dest="ollama_command", required=True)
    f = osub.add_parser("fetch", help="fetch each model once into the cache, verified by digest; print JSON")
    f.add_argument("--plan", action="append", help="a plan.json written by `vilms render` (its ollama_pulls)")
    f.add_argument("--model", action="append", help="a model name (repeatable)")
    f.add_argument("--cache", default=os.path.expanduser("~/.cache/vilms/ollama"))
    source = f.add_mutually_exclusive_group()
    source.add_argument("--registry", help="a registry v2 URL for every model: a mirror or a site registry (default: each "
                        "model's own, https://registry.ollama.ai for library models; proxy: HTTPS_PROXY etc.)")
    source.add_argument("--store", help="a local Ollama models directory to copy from instead")
    f.add_argument("--retries", type=int, default=5, help="attempts per transfer (resumed after a dropped link)")
    f.add_argument("--retry-delay", type=float, default=2.0, help="seconds before the second attempt (doubles)")
    f.add_argument("--check", action="store_true", help="read the manifests only (sizes, digests): no blob, no write")
    p.set_defaults(func=cmd_ollama)


def cmd_plan(args: argparse.Namespace) -> int:
    """Capacity plan for one host: exit 0 when every model fits (or a tight fit is accepted), 1 when not."""

    from vilms.deploy.capacity_plan import Facts, host_memory, plan_host, render_text

    def fail(issues: list[dict[str, str]]) -> int:
        if args.format == "json":
            print(json.dumps({"ok": False, "errors": issues}, indent=2))
        for issue in issues:
            print(f"vilms plan: {issue['pointer']}: {issue['message']}", file=sys.stderr)
        return 1

    if args.inventory:
        return _plan_inventory(args)
    try:
        config, no_gpu = _plan_source(args)
    except ConfigError as exc:
        return fail([i.as_dict() for i in exc.issues])
    gpu_mib = tuple(float(x) for x in args.gpu_mib.replace("\n", ",").split(",") if x.strip()) if args.gpu_mib else ()
    facts = Facts(gpu_mib=gpu_mib, device_model=args.device_model or "", meminfo_mib=args.meminfo_mib,
                  gpu=not no_gpu)
    try:
        memory = host_memory(config, facts, memory_gb=args.memory_gb, gpus=args.gpus)
    except ValueError as exc:  # no memory figure, or a declared one the probe contradicts
        return fail([{"pointer": getattr(exc, "pointer", "/host"), "message": str(exc), "hint": "", "severity": "error"}])
    plan = plan_host(args.host or config.raw["host"].get("name") or "localhost", config, memory,
                     accept_tight_fit=True if args.accept_tight_fit else None)
    if args.format == "json":
        print(json.dumps({"ok": plan.ok, "hosts": [plan.as_dict()]}, indent=2))
    else:
        sys.stdout.write(render_text([plan]))
    return 0 if plan.ok else 1


def _plan_source(args: argparse.Namespace) -> tuple[Any, bool]:
    """(config, runs without GPU) from --config (validated here) or --render (a render's files: not validated again).

    The Ansible preflight renders each host once (`vilms render`) and plans from that render, so a host's config is
    validated once per run; its GPU mode is the one the render chose.
    """
    from pathlib import Path

    import yaml

    from vilms.config.load import accepted_config

    if args.render:
        out = Path(args.render)
        plan = json.loads((out / "plan.json").read_text(encoding="utf-8"))
        config = accepted_config(yaml.safe_load((out / "config.yaml").read_text(encoding="utf-8")), source=args.render)
        return config, args.no_gpu or plan["gpu_mode"] == "none"
    raw = yaml.safe_load(sys.stdin) if args.config == "-" else read_yaml(args.config)
    return build_config(raw, source=args.config), args.no_gpu


def cmd_schema(args: argparse.Namespace) -> int:
    """Where the installed package keeps the config schema (roles and editors read it from there)."""
    from vilms.config.schema import schema_path

    print(schema_path() if args.path else schema_path().read_text(encoding="utf-8"), end="\n" if args.path else "")
    return 0


def _plan_inventory(args: argparse.Namespace) -> int:
    """Every host of an inventory, from the controller (memory from each host's config or the flags)."""
    from vilms.deploy.capacity_inventory import HostError, plan_inventory
    from vilms.deploy.capacity_plan import render_text

    try:
        results = plan_inventory(args.inventory, args.limit, args.memory_gb, args.gpus, args.vault_password_file)
    except ValueError as exc:
        print(f"vilms plan: {exc}", file=sys.stderr)
        return 1
    ok = bool(results) and all(not isinstance(r, HostError) and r.ok for r in results)
    if args.format == "json":
        print(json.dumps({"ok": ok, "hosts": [r.as_dict() for r in results]}, indent=2))
        return 0 if ok else 1
    for result in results:
        if isinstance(result, HostError):
            layers = f"\n  layers: {' <- '.join(result.layers)}" if result.layers else ""
            print(f"host {result.host}: no plan: {result.message}{layers}\n  verdict: unknown -> FAIL")
        else:
            sys.stdout.write(render_text([result]))
    if not results:
        print(f"vilms plan: no host in {args.inventory} has a vilms config", file=sys.stderr)
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vilms", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("validate", help="check a config against the schema and the alias/engine rules")
    p.add_argument("config")
    p.add_argument("--format", choices=["text", "json"], default="text")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("render", help="validate once and write config.yaml, docker-compose.yaml, plan.json for a host")
    p.add_argument("--config", help="the host's effective config.yaml")
    p.add_argument("--many", help="JSON/YAML {hosts: {NAME: {config, gpu, engine_tag}}}: every host in one process, "
                                  "written to OUT/NAME/ only if all are valid")
    p.add_argument("--out", required=True, help="directory to write into (created if missing)")
    p.add_argument("--gpu", choices=["auto", "yes", "no"], default="auto",
                   help="GPU access for engines (auto: docker.gpu, else detect nvidia tooling here)")
    p.add_argument("--engine-tag", default=None, help="docker.tag.engine when the config leaves it unset (Jetson L4T tag)")
    p.add_argument("--format", choices=["text", "json"], default="text")
    p.set_defaults(func=cmd_render)

    p = sub.add_parser("retag", help="fill docker.tag.engine into a render made before the host's L4T tag was known")
    p.add_argument("--out", required=True, help="the directory `vilms render` wrote")
    p.add_argument("--engine-tag", required=True, help="the tag (applied only where the config leaves it unset)")
    p.add_argument("--gpu", choices=["auto", "yes", "no"], default="auto", help="as given to vilms render")
    p.add_argument("--format", choices=["text", "json"], default="text")
    p.set_defaults(func=cmd_retag)

    _deploy_parsers(sub)
    p = sub.add_parser("schema", help="the config JSON Schema shipped in the installed package")
    p.add_argument("--path", action="store_true", help="print the file's path instead of its content")
    p.set_defaults(func=cmd_schema)

    args = parser.parse_args(argv)
    return args.func(args)


def _deploy_parsers(sub: Any) -> None:
    """The commands that serve, compose, ship and plan (validate/render/retag are above)."""
    p = sub.add_parser("serve", help="run the gateway")
    p.add_argument("--config", default=None, help=f"config.yaml (default: ${CONFIG_ENV})")
    p.add_argument("--host", default=None)
    p.add_argument("--port", type=int, default=None)
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--log-format", choices=["text", "json"], default=None)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("compose", help="render docker-compose.yaml for a config")
    p.add_argument("--config", required=True)
    p.add_argument("--platform", choices=["dgpu", "js"], default=None, help="override host.platform")
    p.add_argument("--gpu", choices=["auto", "yes", "no"], default="auto")
    p.add_argument("--config-mount", default="./config.yaml", help="host path of config.yaml, as the compose file sees it")
    p.add_argument("-o", "--output", default="-")
    p.add_argument("--models-json", action="store_true", help="print {engine service: [models]} instead (for the role)")
    p.set_defaults(func=cmd_compose)

    _weights_parser(sub)
    _ollama_parser(sub)
    _image_parser(sub)
    p = sub.add_parser("plan", help="capacity plan: do this host's models fit its GPU or unified memory?")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--config", help="config.yaml of one host ('-' = stdin)")
    source.add_argument("--inventory", help="an Ansible inventory: every host with a vilms config")
    source.add_argument("--render", help="a directory `vilms render` wrote (its config is not validated again)")
    p.add_argument("--limit", default=None, help="with --inventory: only these hosts (an Ansible --limit pattern)")
    p.add_argument("--vault-password-file", default=None, help="with --inventory: for vaulted inventory values")
    p.add_argument("--memory-gb", type=float, default=None, help="GiB per GPU (dgpu) or the board's memory (Jetson)")
    p.add_argument("--gpus", type=int, default=None, help="number of GPUs (dgpu)")
    p.add_argument("--host", default=None, help="name shown in the report")
    p.add_argument("--gpu-mib", default=None, help="probed: nvidia-smi memory.total per GPU, comma-separated")
    p.add_argument("--device-model", default=None, help="probed: /proc/device-tree/model (Jetson)")
    p.add_argument("--meminfo-mib", type=float, default=None, help="probed: MemTotal in MiB")
    p.add_argument("--no-gpu", action="store_true", help="the host runs the CPU profile (vilms_gpu: false)")
    p.add_argument("--accept-tight-fit", action="store_true", help="as host.accept-tight-fit: true")
    p.add_argument("--format", choices=["text", "json"], default="text")
    p.set_defaults(func=cmd_plan)


if __name__ == "__main__":
    sys.exit(main())

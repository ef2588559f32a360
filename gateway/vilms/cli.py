"""`vilms validate | render | serve | compose`: the operator's entry points."""

from __future__ import annotations

import argparse
import json
import os
import sys

from .config import CONFIG_ENV, ConfigError, build_config, read_yaml
from .schema import ConfigIssue


def _issues_for(path: str) -> tuple[list[ConfigIssue], list[ConfigIssue]]:
    """(errors, warnings) for the config at `path`."""
    from .routing import semantic_issues

    try:
        config = build_config(read_yaml(path), source=path)
    except ConfigError as exc:
        return exc.issues, []
    warnings = list(config.notes) + [i for i in semantic_issues(config) if i.severity == "warning"]
    return [], warnings


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


def cmd_render(args: argparse.Namespace) -> int:
    """Validate once, write config.yaml, docker-compose.yaml, plan.json (and keys.yaml) into --out."""
    from .plan import render_to

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


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from .config import load_config
    from .observe import setup_logging

    path = args.config or os.environ.get(CONFIG_ENV)
    try:
        config = load_config(path)
    except ConfigError as exc:
        print(f"vilms serve: invalid config {path}:\n{exc}", file=sys.stderr)
        return 1
    gw = config.gateway
    setup_logging(args.log_format or gw["log-format"], gw["log-level"])
    workers = args.workers or gw["workers"]
    os.environ[CONFIG_ENV] = os.path.abspath(path)
    if args.log_format:
        os.environ["VILMS_LOG_FORMAT"] = args.log_format
    uvicorn.run("vilms.api.factory:app", factory=True, host=args.host or gw["host"], port=args.port or gw["port"],
                workers=workers, loop="uvloop", http="httptools", access_log=False, log_level="warning",
                timeout_keep_alive=30, backlog=4096)
    return 0


def cmd_compose(args: argparse.Namespace) -> int:
    from .compose import render_compose

    try:
        config = build_config(read_yaml(args.config), source=args.config)
    except ConfigError as exc:
        print(f"vilms compose: invalid config {args.config}:\n{exc}", file=sys.stderr)
        return 1
    if args.models_json:
        from .compose import compose_context_models

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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vilms", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("validate", help="check a config against the schema and the alias/engine rules")
    p.add_argument("config")
    p.add_argument("--format", choices=["text", "json"], default="text")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("render", help="validate once and write config.yaml, docker-compose.yaml, plan.json for a host")
    p.add_argument("--config", required=True, help="the host's effective config.yaml")
    p.add_argument("--out", required=True, help="directory to write into (created if missing)")
    p.add_argument("--gpu", choices=["auto", "yes", "no"], default="auto",
                   help="GPU access for engines (auto: docker.gpu, else detect nvidia tooling here)")
    p.add_argument("--engine-tag", default=None, help="docker.tag.engine when the config leaves it unset (Jetson L4T tag)")
    p.add_argument("--format", choices=["text", "json"], default="text")
    p.set_defaults(func=cmd_render)

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

    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())

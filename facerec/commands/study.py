"""``run.py study``: the SN paper's normalization study (norms x (GPUs, images per GPU)) from one config."""
from __future__ import annotations

HELP = ("train one run per norm and (GPUs x images per GPU) setting and tabulate their verification "
        "accuracy, as the SN paper's table (resumable; one process)")


def add_arguments(parser) -> None:
    parser.add_argument("--config", required=True,
                        help="YAML config with a study section (configs/study_*.yaml)")
    parser.add_argument("--norms", help="comma-separated norms (default: study.norms), e.g. sn,bn,gn")
    parser.add_argument("--settings", help="comma-separated GPUSxIMAGES settings (default: study.settings), "
                        "e.g. 8x32,8x4,1x16")
    parser.add_argument("--quick", action="store_true", help="only study.quick_settings")
    parser.add_argument("--output", help="study folder (default: studies/<config name>)")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value",
                        help="override config values for every run, e.g. train.epochs=3 train.device=cuda")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for configuration errors")


def _items(text: str | None, option: str, parse=None) -> list[str] | None:
    if text is None:
        return None
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise ValueError(f"{option}: no items given")
    for item in items:
        if parse is not None:
            parse(item, option)
    return items


def run(args) -> int:
    import time
    from pathlib import Path

    from tqdm import tqdm

    from facerec.config import load_config
    from facerec.outputs import check_output
    from facerec.study import parse_setting, plan_study, run_study
    from facerec.study_report import write_report

    start = time.time()
    config = load_config(args.config, args.overrides)
    if not config["data"]["verify"]:
        raise ValueError(f"{args.config}: data.verify is empty; the study tabulates verification accuracy")
    output = check_output(args.output or Path("studies", Path(args.config).stem), "--output", folder=True)
    specs = plan_study(config, output, norms=_items(args.norms, "--norms"),
                       settings=_items(args.settings, "--settings", parse_setting), quick=args.quick)
    print(f"study of {len(specs)} runs ({', '.join(dict.fromkeys(s.norm for s in specs))} x "
          f"{', '.join(dict.fromkeys(s.setting for s in specs))}) in {output}; each run's output is in "
          f"its folder's train.log", flush=True)

    def report(results):
        return write_report(output, config, specs, results, time.time() - start, source=args.config)

    results = run_study(config, specs, output, write_report=report, say=tqdm.write)
    paths = report(results)
    print(f"wrote {', '.join(str(p) for p in paths)}")
    stopped = [r for r in results if r is not None and r["status"] == "stopped"]
    if stopped:
        print(f"stopped during {stopped[0]['norm']} {stopped[0]['setting']}; run the same command to "
              "resume it and the runs after it", flush=True)
        return 130
    return 0

"""`fibemrss study validate|hash|show`: study documents, checked and identified before anyone runs them."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from fibemrss.domain.errors import InvalidArgument
from fibemrss.domain.study import parse_study, study_hash, study_to_json
from fibemrss.domain.task_spec import TaskSpec
from fibemrss.domain.tasks import TASKS, get_task


def add_parser(subparsers: Any) -> None:
    study = subparsers.add_parser("study", help="study documents: validate, hash, show").add_subparsers(
        dest="study_command", required=True
    )
    for name, text in (
        ("validate", "check a document; every bad field is named (exit 1)"),
        ("hash", "the study's identity: SHA-256 of its canonical form"),
        ("show", "what the study reads, predicts and trains, as JSON"),
    ):
        p = study.add_parser(name, help=text)
        p.add_argument("study", help="a document (YAML or JSON) or the name of a shipped study")
        p.set_defaults(func=run, study_command=name)
    listing = study.add_parser("list", help="the shipped studies and their hashes")
    listing.set_defaults(func=run_list)


def _load(ref: str) -> TaskSpec:
    path = Path(ref)
    if path.is_file():
        return parse_study(path.read_bytes(), path.name)
    return get_task(ref)


def run(args: argparse.Namespace) -> int:
    try:
        task = _load(args.study)
    except InvalidArgument as exc:
        for v in exc.violations:
            print(f"{v.field}: {v.description}", file=sys.stderr)
        print(f"fibemrss: {args.study}: {exc}", file=sys.stderr)
        return 1
    if args.study_command == "validate":
        print(f"{task.name} version {task.version}: valid ({study_hash(task)})")
    elif args.study_command == "hash":
        print(study_hash(task))
    else:
        print(json.dumps({"hash": study_hash(task), **study_to_json(task)}, indent=2))
    return 0


def run_list(args: argparse.Namespace) -> int:
    for name in sorted(TASKS):
        print(f"{name}  version {TASKS[name].version}  {study_hash(TASKS[name])}")
    return 0

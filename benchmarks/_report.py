"""Printing shared by the benchmark scripts: one JSON object with --json, else one `key: value` line each."""

import json


def emit(report: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(report))
    else:
        for key, value in report.items():
            print(f"{key}: {value}")

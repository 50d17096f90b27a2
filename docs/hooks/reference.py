"""MkDocs hook: the command-line and HTTP references, generated at build time from the code itself.

`docs/reference/cli.md` and `docs/reference/http.md` hold a marker that this hook replaces with what
`soundtag.cli.build_parser()` and the FastAPI app of `soundtag serve` say (argparse's own help texts,
FastAPI's OpenAPI schema), so the reference cannot drift from the code. The schema is also written to
the site as `reference/openapi.json`.
"""

from __future__ import annotations

import argparse
import json
import os

CLI_MARKER = "<!-- generated: cli -->"
HTTP_MARKER = "<!-- generated: http -->"


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def _option(action: argparse.Action) -> str:
    if not action.option_strings:
        return f"`{action.metavar or action.dest}`"
    names = ", ".join(action.option_strings)
    if action.nargs == 0:
        return f"`{names}`"
    metavar = action.metavar or action.dest.upper()
    if isinstance(metavar, tuple):
        metavar = " ".join(metavar)
    if action.choices is not None and action.metavar is None:
        metavar = "{" + ",".join(map(str, action.choices)) + "}"
    suffix = f" {metavar} ..." if action.nargs in ("+", "*") else f" {metavar}"
    return f"`{names}{suffix}`"


def _help(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    if not action.help:
        return ""
    return _cell(parser._get_formatter()._expand_help(action))  # argparse's own %(default)s expansion


def cli_markdown() -> str:
    from soundtag.cli import build_parser

    os.environ["COLUMNS"] = "100"  # argparse wraps usage lines at the terminal's width: the same on every machine
    top = build_parser()
    out = ["Generated from `soundtag.cli.build_parser()` when the documentation is built.", "",
           "```text", top.format_usage().strip(), "```", ""]
    subactions = [a for a in top._actions if isinstance(a, argparse._SubParsersAction)]
    for sub in subactions:
        helps = {c.dest: c.help for c in sub._choices_actions}
        for name, parser in sub.choices.items():
            out += [f"## soundtag {name}", "", _cell(helps.get(name) or parser.description or ""), "",
                    "```text", parser.format_usage().replace("usage: ", "").strip(), "```", ""]
            if parser.description and parser.description != helps.get(name):
                out += [_cell(parser.description), ""]
            rows = [a for a in parser._actions if a.help != argparse.SUPPRESS and not isinstance(a, argparse._HelpAction)]
            if rows:
                out += ["| argument | meaning |", "|---|---|"]
                out += [f"| {_option(a)} | {_help(parser, a)} |" for a in rows]
                out.append("")
            if parser.epilog:
                out += [_cell(parser.epilog), ""]
    return "\n".join(out)


def openapi_schema() -> dict:
    from soundtag.serve import ServeConfig, create_app
    from soundtag.tagger import TaggerOptions

    # The model is loaded by the app's lifespan only: building the app and its schema needs no model file.
    return create_app(ServeConfig(options=TaggerOptions(model_path="model.tflite"))).openapi()


def http_markdown(schema: dict) -> str:
    out = [f"Generated from the OpenAPI schema of `soundtag serve` (FastAPI; soundtag {schema['info']['version']}) "
           "when the documentation is built; the schema itself: [openapi.json](openapi.json).", "",
           "| method | path | summary | parameters | answers |", "|---|---|---|---|---|"]
    for path, methods in schema["paths"].items():
        for method, op in methods.items():
            params = ", ".join(f"`{p['name']}` ({p['in']})" for p in op.get("parameters", []))
            body = op.get("requestBody", {}).get("content", {})
            if body:
                kinds = [f"`{kind}` (" + ", ".join(f"`{name}`" for name in c.get("schema", {}).get("properties", {})) + ")"
                         for kind, c in body.items()]
                params = ", ".join(filter(None, [params, "body: " + ", ".join(kinds)]))
            summary = op.get("description") or op.get("summary") or ""
            generic = (None, "Successful Response", "Validation Error")  # FastAPI's defaults say nothing
            answers = "<br>".join(code if r.get("description") in generic else f"{code}: {_cell(r['description'])}"
                                  for code, r in sorted(op.get("responses", {}).items()))
            out.append(f"| {method.upper()} | `{path}` | {_cell(summary)} | {params} | {answers} |")
    return "\n".join(out) + "\n"


_schema: dict | None = None


def on_files(files, config):
    global _schema
    from mkdocs.structure.files import File

    _schema = openapi_schema()
    files.append(File.generated(config, "reference/openapi.json", content=json.dumps(_schema, indent=1)))
    return files


def on_page_markdown(markdown: str, page, config, files) -> str:
    if CLI_MARKER in markdown:
        markdown = markdown.replace(CLI_MARKER, cli_markdown())
    if HTTP_MARKER in markdown:
        markdown = markdown.replace(HTTP_MARKER, http_markdown(_schema or openapi_schema()))
    return markdown

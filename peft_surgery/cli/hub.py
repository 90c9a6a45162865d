"""``peft-surgery push``: upload an existing output folder (or file) to the Hugging Face Hub."""

from __future__ import annotations

import json
from pathlib import Path

import click

from ..errors import SurgeryError
from ..hub import push_folder
from .common import echo_json, handle_errors, json_option, quiet_option


@click.command("push")
@click.argument("output", metavar="OUT", type=click.Path())
@click.argument("repo_id", metavar="REPO_ID")
@click.option("--private", is_flag=True, help="Create the Hub repo as private.")
@click.option("--commit-message", default=None, help="Commit message (default: 'Upload OUT with peft-surgery').")
@click.option("--dry-run", is_flag=True, help="Upload nothing: print the files and write the model card locally.")
@click.option("--kind", type=click.Choice(["auto", "adapter", "model"]), default="auto", show_default=True,
              help="What OUT is, for the model card (auto: adapter unless it has a model config.json).")
@click.option("--base-model", default=None, help="Base model repo id for the card (default: from the adapter config).")
@click.option("--command", "produced_by", default=None, metavar="TEXT",
              help="The command that produced OUT, recorded in the model card.")
@click.option("--report", "report_path", default=None, type=click.Path(exists=True, dir_okay=False),
              help="A JSON report (from --json or Report.save_json) to include as the card's error table.")
@click.option("--no-card", is_flag=True, help="Do not generate a README.md model card.")
@json_option
@quiet_option
@handle_errors
def push_cmd(output, repo_id, private, commit_message, dry_run, kind, base_model, produced_by, report_path, no_card,
             as_json, quiet):
    """Upload OUT (an adapter or model folder, or one .safetensors file) to the Hub repo REPO_ID.

    A model card (README.md) is generated with the base model, library, tags and pipeline tag, the command
    that produced OUT and its error report, unless OUT already has a README.md (e.g. written by a --dry-run,
    then reviewed), which is uploaded as is. The token comes from HF_TOKEN or `hf auth login`.

    \b
    Example:
      peft-surgery extract org/base org/ft --rank 16 -o adapter --json > report.json
      peft-surgery push adapter me/my-adapter --report report.json --dry-run
      peft-surgery push adapter me/my-adapter --private
    """
    report = None
    if report_path:
        try:
            report = json.loads(Path(report_path).read_text())
        except json.JSONDecodeError as exc:
            raise SurgeryError(f"not a JSON report ({exc.msg} at line {exc.lineno})", path=report_path) from None
        if not isinstance(report, dict):
            raise SurgeryError("not a JSON report object", path=report_path)
    result = push_folder(output, repo_id, private=private, commit_message=commit_message, report=report,
                         kind=None if kind == "auto" else kind, base_model=base_model, command=produced_by,
                         dry_run=dry_run, card=not no_card)
    if as_json:
        echo_json(result.to_dict())
    elif not quiet:
        click.echo(result.to_text())


commands = [push_cmd]

"""`zagreus release`: the model to ship as a Hugging Face folder with its model card, optionally
uploaded to the hub."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from zagreus import __version__
from zagreus.checkpoint import load_model_and_tokenizer
from zagreus.errors import UserError
from zagreus.release.card import LISTING, build_model_card, read_listing
from zagreus.release.export import export
from zagreus.release.gguf import QUANTS, write_release_ggufs
from zagreus.rundir import POST_STAGES, locate

log = logging.getLogger(__name__)


def release(source: Path, out: Path | None = None, push: str | None = None, private: bool = False,
            gguf: list[str] = ()) -> Path:
    """Export `source` (run directory, checkpoint or export folder) into `out` with a model card,
    and a GGUF file per quant in `gguf` (f16, q8_0, q4_0).

    A run directory ships the last model it made (RunDir.final_model); `out` defaults to
    RUN_DIR/release, or to a release/ folder beside a model that belongs to no run.
    """
    unknown = [q for q in gguf if q not in QUANTS]
    if unknown:
        raise UserError(f"--gguf {unknown[0]}: choose among {', '.join(QUANTS)}")
    located = locate(source)
    run = located.run
    if located.kind == "run":
        final = run.final_model()
        if final is None:
            raise UserError(f"{source}: no model to release yet (no finished SFT/DPO export, no complete checkpoint); "
                            f"run `zagreus pretrain RECIPE` first")
        located = locate(final)
    model = located.path
    # Which post-training stage made the released model, so the card claims only what was done to it.
    post_stage = located.stage if located.stage in POST_STAGES else None
    out = Path(out) if out is not None else run.release if run is not None else model.parent / "release"
    if located.kind == "export":
        # Loading it first refuses a damaged folder (config, weights, tokenizer) in one line,
        # before anything is copied into the release.
        load_model_and_tokenizer(model)
        if out.resolve() != model.resolve():
            # Its GGUFs, if any, are its own: the release lists only those it writes itself.
            shutil.copytree(model, out, dirs_exist_ok=True, ignore=shutil.ignore_patterns("*.gguf", LISTING))
    else:
        export(model, out)
    # GGUFs of an earlier release of this folder were made from other weights.
    for entry in read_listing(out):
        (out / entry["file"]).unlink(missing_ok=True)
    (out / LISTING).unlink(missing_ok=True)
    if gguf:
        write_release_ggufs(out, list(gguf), run)
    local_card = build_model_card(out, run, None, post_stage)
    (out / "README.md").write_text(build_model_card(out, run, push, post_stage) if push else local_card, encoding="utf-8")
    log.info("release folder %s written from %s", out, model)
    if push:
        try:
            _push(out, push, private)
        except UserError:
            (out / "README.md").write_text(local_card, encoding="utf-8")  # the card names no repo it is not in
            raise
    return out


def _push(folder: Path, repo_id: str, private: bool) -> None:
    # huggingface_hub (and httpx) only for an upload: imported here.
    import httpx
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    api = HfApi()
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        api.upload_folder(folder_path=str(folder), repo_id=repo_id, commit_message=f"zagreus {__version__} release")
    except (HfHubHTTPError, OSError, httpx.HTTPError) as exc:
        raise UserError(f"upload to {repo_id} failed: {exc}; check `huggingface-cli login` and the network, "
                        f"the folder {folder} is complete and can be uploaded later") from None

"""`safepatch push OUT_DIR REPO_ID`: upload a finished patched model to the Hugging Face Hub.

Python twin: :func:`safepatch_merge.push.push_model`.
"""
from __future__ import annotations

import argparse

EPILOG = """\
examples:
  safepatch push out/patched-model my-user/smollm2-135m-safepatched --dry-run
  safepatch push out/patched-model my-user/smollm2-135m-safepatched --private
  safepatch push out/patched-model my-org/model --revision sweep-a0.1 \\
      --commit-message "SafePatching a=0.1 b=0.1 p=0.5"

The directory must be complete: config.json, safetensors weights (shards matching
model.safetensors.index.json), tokenizer files and a model card (README.md), and no sign of an
unfinished write (*.partial, *.inprogress). Only regular files inside the directory are
uploaded: a symbolic link that points outside it is refused (or, with --skip-untrusted-links,
left out), and dotfiles (.env ...) and files much larger than the model's shards are warned
about (also in --dry-run). The token is read by huggingface_hub from HF_TOKEN
or the `hf auth login` cache; it is never printed. HF_ENDPOINT selects another Hub.
"""


def add_parser(sub) -> None:
    p = sub.add_parser(
        "push", help="upload a patched model directory to the Hugging Face Hub",
        description="Check that OUT_DIR is a complete model directory, then upload it to the "
                    "Hub model repository REPO_ID (created if absent) with huggingface_hub.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out_dir", help="the patched model directory (e.g. the output of merge)")
    p.add_argument("repo_id", help="Hub repository, namespace/name")
    p.add_argument("--private", action="store_true",
                   help="create the repository private (no effect on an existing one)")
    p.add_argument("--revision", default=None, metavar="BRANCH",
                   help="branch to commit to, created from main if absent (default main)")
    p.add_argument("--commit-message", default=None, metavar="MSG", help="commit message")
    p.add_argument("--large-folder", choices=("auto", "yes", "no"), default="auto",
                   help="use the resumable multi-commit large-folder upload: auto (above "
                        "5 GB or 100 files), yes, no (default auto)")
    p.add_argument("--dry-run", action="store_true",
                   help="check and list the files that would be uploaded; upload nothing")
    p.add_argument("--skip-untrusted-links", action="store_true",
                   help="leave out links that point outside OUT_DIR (warned) instead of "
                        "refusing the push")
    p.set_defaults(func=run)


def run(args) -> int:
    import logging

    from ..push import human_size, push_model

    # One line per HTTP request from the Hub client is noise unless debugging (-v).
    if not logging.getLogger().isEnabledFor(logging.DEBUG):
        for name in ("httpx", "httpx2", "httpcore"):
            logging.getLogger(name).setLevel(logging.WARNING)

    large = {"auto": None, "yes": True, "no": False}[args.large_folder]
    res = push_model(args.out_dir, args.repo_id, private=args.private, revision=args.revision,
                     commit_message=args.commit_message, dry_run=args.dry_run, large=large,
                     skip_untrusted=args.skip_untrusted_links)
    if args.dry_run:
        width = max(len(str(f.size)) for f in res.files)
        for f in res.files:
            print(f"{f.size:>{width}}  {human_size(f.size):>9}  {f.path}")
        print(f"dry run: would upload {len(res.files)} files, {res.total_bytes} bytes "
              f"({human_size(res.total_bytes)}) to {res.repo_id}@{res.revision} "
              f"with {res.method}; nothing uploaded")
    else:
        print(f"pushed {len(res.files)} files ({human_size(res.total_bytes)}) to "
              f"{res.repo_id}@{res.revision}: {res.url}")
    return 0

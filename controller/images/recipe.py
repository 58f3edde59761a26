"""Image recipes (`amis/*.yaml`): what a baked image contains, and the content hash that names it.

The hash covers everything that shapes the image: the recipe, the files it copies in, its parent's
hash, the host agent's code when the image carries it, and the bake procedure itself. An image whose
hash matches is up to date; anything else is a new image, never a modified one.
"""

from __future__ import annotations

import hashlib
import tomllib
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic.alias_generators import to_camel

from controller.profile import Finding, ProfileError
from controller.profile.source import read_document

RECIPES_DIR = Path(__file__).resolve().parents[2] / "amis"
_HOST_AGENT_DIR = Path(__file__).resolve().parents[2] / "host_agent"
_EBPF_DIR = _HOST_AGENT_DIR.parent / "ebpf"


def sandbox_requirements() -> list[str]:
    """The `sandbox` extra of pyproject.toml: what baked images install for the daemon."""
    with (_HOST_AGENT_DIR.parent / "pyproject.toml").open("rb") as stream:
        extras: dict[str, list[str]] = tomllib.load(stream)["project"]["optional-dependencies"]
    return extras["sandbox"]


_BAKE_CODE = (Path(__file__).with_name("bake.py"), Path(__file__).with_name("chroot.py"))


class _RecipeModel(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, alias_generator=to_camel, populate_by_name=True)


class BaseSystem(_RecipeModel):
    suite: Literal["bookworm"] = Field("bookworm", description="Debian release to bootstrap.")
    mirror: str = Field("http://deb.debian.org/debian", description="Debian mirror debootstrap and apt use.")


class ImageFile(_RecipeModel):
    path: str = Field(pattern=r"^/", description="Absolute path inside the image.")
    mode: str = Field("0644", pattern=r"^0[0-7]{3}$")
    source: str = Field(description="File beside the recipe whose content is copied in.")


class RecipeSpec(_RecipeModel):
    base: BaseSystem | None = Field(None, description="Bootstrap from Debian (exclusive with parent).")
    parent: str | None = Field(None, description="Start from another recipe's image.")
    packages: list[str] = Field(default_factory=list, description="Debian packages to install.")
    files: list[ImageFile] = Field(default_factory=list, description="Files to copy into the image.")
    units: list[str] = Field(default_factory=list, description="systemd units to enable.")
    trust_host_ca: bool = Field(True, alias="trustHostCA", description="Add the host's CA bundle to the image's trust.")
    host_agent: bool = Field(False, description="Install km-host-agent and its unit.")


class RecipeMetadata(_RecipeModel):
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9.-]*$")


class ImageRecipe(_RecipeModel):
    api_version: Literal["klankermaker.ai/v1alpha1"]
    kind: Literal["ImageRecipe"]
    metadata: RecipeMetadata
    spec: RecipeSpec


class LoadedRecipe:
    """A recipe with the file it came from and its content hash (parents resolved)."""

    def __init__(self, recipe: ImageRecipe, file: Path, content_hash: str, parent: LoadedRecipe | None) -> None:
        self.recipe = recipe
        self.file = file
        self.hash = content_hash
        self.parent = parent

    @property
    def name(self) -> str:
        return self.recipe.metadata.name

    @property
    def image_name(self) -> str:
        return f"{self.name}-{self.hash[:12]}"

    def source_path(self, image_file: ImageFile) -> Path:
        return self.file.parent / image_file.source


def recipe_names(directory: Path = RECIPES_DIR) -> list[str]:
    return sorted(path.stem for path in directory.glob("*.yaml"))


def load_recipe(name: str, directory: Path = RECIPES_DIR, _chain: tuple[str, ...] = ()) -> LoadedRecipe:
    """Load `amis/<name>.yaml` and its parents; errors name the file, line and fix like profile errors."""
    file = directory / f"{name}.yaml"
    if not file.is_file():
        known = ", ".join(recipe_names(directory)) or "none"
        raise ProfileError([Finding((), f"no image recipe named {name!r} in {directory} (known: {known})")])
    if name in _chain:
        raise ProfileError([Finding(("spec", "parent"), f"recipe parent cycle: {' → '.join(_chain + (name,))}")])
    document = read_document(file)
    try:
        recipe = ImageRecipe.model_validate(document.data)
    except ValidationError as error:
        raise ProfileError(
            [Finding(tuple(e["loc"]), e["msg"], document.location(tuple(e["loc"]))) for e in error.errors(include_url=False)]
        ) from None
    spec = recipe.spec
    if recipe.metadata.name != name:
        where = ("metadata", "name")
        message = f"the recipe in {file.name} is named {recipe.metadata.name!r}; a recipe's name is its file name ({name!r})"
        raise ProfileError([Finding(where, message, document.location(where))])
    if (spec.base is None) == (spec.parent is None):
        raise ProfileError([Finding(("spec",), "a recipe has exactly one of base or parent", document.location(("spec",)))])
    parent = None
    if spec.parent is not None:
        if not (directory / f"{spec.parent}.yaml").is_file():
            where = ("spec", "parent")
            known = ", ".join(recipe_names(directory))
            raise ProfileError(
                [
                    Finding(
                        where,
                        f"parent recipe {spec.parent!r} not found in {directory} (known: {known})",
                        document.location(where),
                    )
                ]
            )
        parent = load_recipe(spec.parent, directory, _chain + (name,))
    digest = hashlib.sha256()
    digest.update(file.read_bytes())
    for image_file in spec.files:
        source = file.parent / image_file.source
        if not source.is_file():
            where = ("spec", "files")
            raise ProfileError([Finding(where, f"source file {source} does not exist", document.location(where))])
        digest.update(image_file.path.encode() + b"\0" + source.read_bytes())
    if parent is not None:
        digest.update(parent.hash.encode())
    if spec.host_agent:
        # Everything the image's km wheel carries for the daemon, and the dependencies it installs.
        for directory in (_HOST_AGENT_DIR, _EBPF_DIR):
            for code in sorted(directory.rglob("*")):
                if code.is_file() and code.suffix in (".py", ".service", ".c"):
                    digest.update(str(code.relative_to(directory.parent)).encode() + b"\0" + code.read_bytes())
        digest.update("\n".join(sandbox_requirements()).encode())
    for code in _BAKE_CODE:
        digest.update(code.read_bytes())
    return LoadedRecipe(recipe, file, digest.hexdigest(), parent)

"""Image recipes: parents resolve, the content hash moves exactly when what shapes the image moves,
and a broken recipe is a ProfileError that names the file, the field and the fix.

Each test works on a copy of `amis/` in tmp_path, so edits never touch the shipped recipes.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from controller.images.recipe import RECIPES_DIR, load_recipe, recipe_names
from controller.profile import ProfileError
from tests.conftest import REPO_ROOT

SHIPPED = ["amazon-linux-2023", "debian-12", "debian-12-resolved"]
BASE_BLOCK = "  base:\n    suite: bookworm\n    mirror: http://deb.debian.org/debian\n"


@pytest.fixture
def recipes(tmp_path: Path) -> Path:
    directory = tmp_path / "amis"
    shutil.copytree(RECIPES_DIR, directory)
    return directory


def edit(file: Path, old: str, new: str) -> None:
    text = file.read_text(encoding="utf-8")
    assert old in text, f"{old!r} is not in {file}; the shipped recipe changed, update this test"
    file.write_text(text.replace(old, new), encoding="utf-8")


def hashes(directory: Path) -> dict[str, str]:
    return {name: load_recipe(name, directory).hash for name in SHIPPED}


def profile_error(name: str, directory: Path) -> ProfileError:
    with pytest.raises(ProfileError) as raised:
        load_recipe(name, directory)
    return raised.value


# ---- the shipped recipes -----------------------------------------------------------------------


def test_the_recipes_directory_is_the_repositorys_amis() -> None:
    assert RECIPES_DIR == REPO_ROOT / "amis"
    assert recipe_names() == SHIPPED


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_recipe_loads(name: str) -> None:
    recipe = load_recipe(name)
    assert recipe.name == name
    assert recipe.file == RECIPES_DIR / f"{name}.yaml"
    assert re.fullmatch(r"[0-9a-f]{64}", recipe.hash)
    assert recipe.image_name == f"{name}-{recipe.hash[:12]}"
    for image_file in recipe.recipe.spec.files:
        assert recipe.source_path(image_file).is_file()


def test_debian_12_is_a_base_image_with_the_host_agent() -> None:
    recipe = load_recipe("debian-12")
    spec = recipe.recipe.spec
    assert recipe.parent is None
    assert spec.base is not None and spec.base.suite == "bookworm"
    assert spec.host_agent and spec.trust_host_ca
    assert "systemd-sysv" in spec.packages and "libbpf1" in spec.packages and "python3-bpfcc" not in spec.packages
    assert spec.units == ["km-firstboot.service"]


def test_amazon_linux_2023_is_debian_12_with_yum_and_dnf() -> None:
    recipe = load_recipe("amazon-linux-2023")
    assert recipe.parent is not None and recipe.parent.name == "debian-12"
    assert recipe.parent.hash == load_recipe("debian-12").hash
    assert recipe.recipe.spec.base is None
    files = {image_file.path: (image_file.mode, image_file.source) for image_file in recipe.recipe.spec.files}
    assert files == {
        "/usr/local/bin/yum": ("0755", "files/yum-apt.sh"),
        "/usr/local/bin/dnf": ("0755", "files/yum-apt.sh"),
    }


def test_recipe_names_lists_yaml_files_only(recipes: Path) -> None:
    (recipes / "notes.txt").write_text("not a recipe\n")
    assert recipe_names(recipes) == SHIPPED
    assert recipe_names(recipes / "files") == []


# ---- the content hash --------------------------------------------------------------------------


def test_a_copy_hashes_the_same_as_the_shipped_recipes(recipes: Path) -> None:
    """The hash is of content, not of where the recipes live, and loading twice changes nothing."""
    shipped = {name: load_recipe(name).hash for name in SHIPPED}
    assert hashes(recipes) == shipped
    assert hashes(recipes) == shipped
    assert shipped["debian-12"] != shipped["amazon-linux-2023"]


def test_a_parents_change_changes_the_childs_hash(recipes: Path) -> None:
    before = hashes(recipes)
    edit(recipes / "debian-12.yaml", "    - tmux\n", "    - tmux\n    - git\n")
    after = hashes(recipes)
    assert after["debian-12"] != before["debian-12"]
    assert after["amazon-linux-2023"] != before["amazon-linux-2023"]
    assert load_recipe("amazon-linux-2023", recipes).parent.hash == after["debian-12"]  # type: ignore[union-attr]


def test_a_childs_change_leaves_the_parent_alone(recipes: Path) -> None:
    before = hashes(recipes)
    edit(
        recipes / "amazon-linux-2023.yaml",
        'mode: "0755"\n      source: files/yum-apt.sh\n    - path: /usr/local/bin/dnf',
        'mode: "0700"\n      source: files/yum-apt.sh\n    - path: /usr/local/bin/dnf',
    )
    after = hashes(recipes)
    assert after["amazon-linux-2023"] != before["amazon-linux-2023"]
    assert after["debian-12"] == before["debian-12"]


def test_changing_a_files_source_changes_the_hash(recipes: Path) -> None:
    before = hashes(recipes)
    with (recipes / "files" / "yum-apt.sh").open("a", encoding="utf-8") as script:
        script.write("# one more line\n")
    after = hashes(recipes)
    assert after["amazon-linux-2023"] != before["amazon-linux-2023"]
    assert after["debian-12"] == before["debian-12"]


def test_changing_a_parents_files_source_changes_both_hashes(recipes: Path) -> None:
    before = hashes(recipes)
    with (recipes / "files" / "km-firstboot.service").open("a", encoding="utf-8") as unit:
        unit.write("# changed\n")
    after = hashes(recipes)
    assert after["debian-12"] != before["debian-12"]
    assert after["amazon-linux-2023"] != before["amazon-linux-2023"]


def test_pointing_a_file_at_another_source_changes_the_hash(recipes: Path) -> None:
    shutil.copyfile(recipes / "files" / "yum-apt.sh", recipes / "files" / "dnf-apt.sh")
    before = hashes(recipes)
    # The recipe text changes, even though the content copied in is identical.
    edit(recipes / "amazon-linux-2023.yaml", "      source: files/yum-apt.sh\n", "      source: files/dnf-apt.sh\n")
    assert hashes(recipes)["amazon-linux-2023"] != before["amazon-linux-2023"]


def test_the_installed_path_is_part_of_the_hash(recipes: Path) -> None:
    before = hashes(recipes)
    edit(recipes / "amazon-linux-2023.yaml", "path: /usr/local/bin/dnf", "path: /usr/bin/dnf")
    assert hashes(recipes)["amazon-linux-2023"] != before["amazon-linux-2023"]


def test_files_not_named_by_a_recipe_do_not_matter(recipes: Path) -> None:
    before = hashes(recipes)
    (recipes / "files" / "unused.conf").write_text("nothing uses this\n")
    (recipes / "README.md").write_text("rewritten\n")
    assert hashes(recipes) == before


def test_image_name_is_the_recipe_name_and_twelve_hex_of_the_hash(recipes: Path) -> None:
    recipe = load_recipe("amazon-linux-2023", recipes)
    name, short = recipe.image_name.rsplit("-", 1)
    assert name == "amazon-linux-2023"
    assert len(short) == 12 and recipe.hash.startswith(short)


# ---- errors ------------------------------------------------------------------------------------


def test_an_unknown_recipe_lists_the_known_ones(recipes: Path) -> None:
    error = profile_error("ubuntu-24", recipes)
    assert (
        str(error) == f"no image recipe named 'ubuntu-24' in {recipes} (known: amazon-linux-2023, debian-12, debian-12-resolved)"
    )


def test_an_unknown_recipe_in_an_empty_directory_says_none_are_known(tmp_path: Path) -> None:
    assert "(known: none)" in str(profile_error("debian-12", tmp_path))


def test_an_unknown_parent_is_named_with_the_known_recipes(recipes: Path) -> None:
    edit(recipes / "amazon-linux-2023.yaml", "parent: debian-12", "parent: debian-11")
    message = str(profile_error("amazon-linux-2023", recipes))
    assert "'debian-11'" in message and "known: amazon-linux-2023, debian-12, debian-12-resolved" in message


def test_an_unknown_parent_names_the_recipe_that_asks_for_it(recipes: Path) -> None:
    edit(recipes / "amazon-linux-2023.yaml", "parent: debian-12", "parent: debian-11")
    error = profile_error("amazon-linux-2023", recipes)
    assert [finding.location.file for finding in error.findings] == [recipes / "amazon-linux-2023.yaml"]


def test_a_parent_cycle_is_refused_with_the_chain(recipes: Path) -> None:
    edit(recipes / "debian-12.yaml", BASE_BLOCK, "  parent: amazon-linux-2023\n")
    error = profile_error("amazon-linux-2023", recipes)
    assert "recipe parent cycle: amazon-linux-2023 → debian-12 → amazon-linux-2023" in str(error)
    assert [finding.dotted_path for finding in error.findings] == ["spec.parent"]
    assert "debian-12 → amazon-linux-2023 → debian-12" in str(profile_error("debian-12", recipes))


def test_a_recipe_that_is_its_own_parent_is_a_cycle(recipes: Path) -> None:
    edit(recipes / "debian-12.yaml", BASE_BLOCK, "  parent: debian-12\n")
    assert "recipe parent cycle: debian-12 → debian-12" in str(profile_error("debian-12", recipes))


@pytest.mark.parametrize(
    ("old", "new"),
    [
        (BASE_BLOCK, BASE_BLOCK + "  parent: amazon-linux-2023\n"),  # both
        (BASE_BLOCK, ""),  # neither
    ],
    ids=["both", "neither"],
)
def test_a_recipe_has_exactly_one_of_base_or_parent(recipes: Path, old: str, new: str) -> None:
    edit(recipes / "debian-12.yaml", old, new)
    error = profile_error("debian-12", recipes)
    file = recipes / "debian-12.yaml"
    assert str(error) == f"{file}:6: spec: a recipe has exactly one of base or parent"
    assert error.findings[0].location.file == file and error.findings[0].location.line == 6


def test_a_missing_source_file_is_named_with_the_recipe_line(recipes: Path) -> None:
    (recipes / "files" / "km-firstboot.service").unlink()
    error = profile_error("debian-12", recipes)
    file = recipes / "debian-12.yaml"
    [finding] = error.findings
    assert finding.dotted_path == "spec.files"
    assert finding.location.file == file and finding.location.line is not None
    assert f"source file {recipes / 'files' / 'km-firstboot.service'} does not exist" in str(error)
    assert str(error).startswith(f"{file}:")


def test_a_missing_source_in_the_parent_fails_the_child_too(recipes: Path) -> None:
    (recipes / "files" / "tracefs-no-rawio.conf").unlink()
    message = str(profile_error("amazon-linux-2023", recipes))
    assert "tracefs-no-rawio.conf does not exist" in message and "debian-12.yaml" in message


def test_a_source_that_is_a_directory_is_not_a_file(recipes: Path) -> None:
    edit(recipes / "debian-12.yaml", "source: files/km-firstboot.service", "source: files")
    assert f"source file {recipes / 'files'} does not exist" in str(profile_error("debian-12", recipes))


def test_an_unknown_field_is_named_with_its_line(recipes: Path) -> None:
    edit(recipes / "debian-12.yaml", "  packages:\n", "  packagez:\n")
    error = profile_error("debian-12", recipes)
    [finding] = error.findings
    assert finding.dotted_path == "spec.packagez"
    assert finding.location.file == recipes / "debian-12.yaml"
    assert finding.location.line == 10
    assert str(error) == f"{recipes / 'debian-12.yaml'}:10: spec.packagez: Extra inputs are not permitted"


@pytest.mark.parametrize(
    ("old", "new", "path"),
    [
        ("kind: ImageRecipe", "kind: SandboxProfile", "kind"),
        ("    suite: bookworm", "    suite: trixie", "spec.base.suite"),
        ("  name: debian-12", "  name: Debian_12", "metadata.name"),
        ("    - path: /etc/systemd/system/km-firstboot.service", "    - path: etc/km-firstboot.service", "spec.files[0].path"),
        ("  hostAgent: true", '  hostAgent: "yes"', "spec.hostAgent"),
    ],
    ids=["kind", "suite", "name", "relative path", "strict bool"],
)
def test_invalid_values_are_profile_errors_at_their_field(recipes: Path, old: str, new: str, path: str) -> None:
    edit(recipes / "debian-12.yaml", old, new)
    error = profile_error("debian-12", recipes)
    assert path in [finding.dotted_path for finding in error.findings]
    assert all(finding.location.file == recipes / "debian-12.yaml" for finding in error.findings)


def test_an_invalid_file_mode_is_refused(recipes: Path) -> None:
    edit(recipes / "amazon-linux-2023.yaml", 'mode: "0755"', 'mode: "755"')
    error = profile_error("amazon-linux-2023", recipes)
    assert [finding.dotted_path for finding in error.findings] == ["spec.files[0].mode", "spec.files[1].mode"]


def test_a_broken_parent_fails_its_child(recipes: Path) -> None:
    edit(recipes / "debian-12.yaml", "  packages:\n", "  packagez:\n")
    message = str(profile_error("amazon-linux-2023", recipes))
    assert "debian-12.yaml:10: spec.packagez" in message


def test_a_recipe_must_be_named_like_its_file(recipes: Path) -> None:
    edit(recipes / "debian-12.yaml", "  name: debian-12", "  name: debian")
    with pytest.raises(ProfileError, match="debian-12"):
        load_recipe("debian-12", recipes)


@pytest.mark.parametrize("source", ["host_agent/daemon.py", "ebpf/gate.bpf.c", "ebpf/gate.py"])
def test_the_daemons_code_and_bpf_programs_are_part_of_the_hash(
    recipes: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, source: str
) -> None:
    """An image carries the km wheel: a change to what the daemon runs must give a new image."""
    import controller.images.recipe as recipe_module

    before = hashes(recipes)["debian-12"]
    tree = tmp_path / "tree"
    for package in ("host_agent", "ebpf"):
        shutil.copytree(REPO_ROOT / package, tree / package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO_ROOT / "pyproject.toml", tree / "pyproject.toml")
    monkeypatch.setattr(recipe_module, "_HOST_AGENT_DIR", tree / "host_agent")
    monkeypatch.setattr(recipe_module, "_EBPF_DIR", tree / "ebpf")
    assert hashes(recipes)["debian-12"] == before
    with (tree / source).open("a") as code:
        code.write("\n// changed\n" if source.endswith(".c") else "\n# changed\n")
    assert hashes(recipes)["debian-12"] != before

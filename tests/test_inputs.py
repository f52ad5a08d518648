import os
from pathlib import Path

import pytest

from deeplab_cli.errors import UsageError
from deeplab_cli.io.inputs import Job, collect, expand, make_jobs, parse_shard, read_list, shard


def touch(root: Path, *names: str) -> None:
    for name in names:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")


@pytest.fixture
def tree(tmp_path):
    """A folder of images with a subfolder, a hidden file, a hidden folder and a non-image."""
    root = tmp_path / "img"
    touch(root, "b.jpg", "a.PNG", "notes.txt", ".partial.png", "sub/c.jpg", "sub/deeper/d.bmp", ".cache/e.jpg")
    return root


def test_expand_folder_takes_top_level_images_only(tree):
    assert expand([str(tree)]) == [tree / "a.PNG", tree / "b.jpg"]


def test_expand_recursive_descends_but_skips_hidden_and_non_images(tree):
    assert expand([str(tree)], recursive=True) == [
        tree / "a.PNG", tree / "b.jpg", tree / "sub/c.jpg", tree / "sub/deeper/d.bmp",
    ]


def test_expand_keeps_named_files_whatever_their_suffix(tree):
    named = [str(tree / "notes.txt"), str(tree / ".partial.png")]
    assert expand(named) == sorted([tree / "notes.txt", tree / ".partial.png"])


def test_expand_follows_linked_folders_once_and_survives_link_loops(tree, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    touch(elsewhere, "x.jpg")
    (tree / "linked").symlink_to(elsewhere)
    (tree / "sub/up").symlink_to(tree)  # a loop: sub/up/sub/up/...
    (tree / "sub/deeper/again").symlink_to(tree / "sub")
    (tree / "dangling").symlink_to(tmp_path / "nowhere")
    assert expand([str(tree)], recursive=True) == [
        tree / "a.PNG", tree / "b.jpg", tree / "linked/x.jpg", tree / "sub/c.jpg", tree / "sub/deeper/d.bmp",
    ]


def test_expand_keeps_missing_paths(tmp_path):
    missing = tmp_path / "gone.jpg"
    assert expand([str(missing)]) == [missing]


def test_expand_removes_duplicates(tree):
    paths = [str(tree), str(tree / "b.jpg"), str(tree / "sub" / ".." / "b.jpg"), str(tree)]
    assert expand(paths) == [tree / "a.PNG", tree / "b.jpg"]


def test_expand_order_is_sorted_and_independent_of_argument_order(tree):
    forward = expand([str(tree / "sub"), str(tree)], recursive=True)
    backward = expand([str(tree), str(tree / "sub")], recursive=True)
    assert forward == backward == sorted(forward)


def test_single_folder_keys_are_relative_without_extension(tree):
    jobs = collect([str(tree)], recursive=True)
    assert [j.key for j in jobs] == ["a", "b", "sub/c", "sub/deeper/d"]
    assert all(j.source.is_absolute() for j in jobs)


def test_single_file_key_is_its_stem(tree):
    assert collect([str(tree / "b.jpg")]) == [Job(tree / "b.jpg", "b")]


def test_same_name_in_two_folders_gets_two_keys(tmp_path):
    touch(tmp_path, "x/img.jpg", "y/img.jpg")
    jobs = collect([str(tmp_path / "x/img.jpg"), str(tmp_path / "y/img.jpg")])
    assert [j.key for j in jobs] == ["x/img", "y/img"]


def test_same_stem_in_one_folder_keeps_extensions(tmp_path):
    touch(tmp_path, "a.jpg", "a.png", "b.jpg")
    assert [j.key for j in collect([str(tmp_path)])] == ["a.jpg", "a.png", "b"]


def test_keys_are_unique_when_a_stripped_name_equals_a_whole_name(tmp_path):
    # `a.jpg.png` stripped is `a.jpg`, which is also the key `a.jpg` keeps beside `a.png`.
    touch(tmp_path, "a.jpg", "a.png", "a.jpg.png")
    keys = [j.key for j in collect([str(tmp_path)])]
    assert sorted(keys) == ["a.jpg", "a.jpg.png", "a.png"]


def test_relative_paths_resolve_from_cwd(tmp_path, monkeypatch):
    touch(tmp_path, "x/img.jpg", "y/img.jpg")
    monkeypatch.chdir(tmp_path)
    jobs = collect(["x/img.jpg", "y"])
    assert jobs == [Job(tmp_path / "x/img.jpg", "x/img"), Job(tmp_path / "y/img.jpg", "y/img")]


def test_make_jobs_of_nothing_is_empty():
    assert make_jobs([], []) == []


def test_read_list_skips_blank_lines_and_strips_crlf():
    data = b"a.jpg\r\n\n   \ndir with space/b.png\nc.jpg"
    assert read_list(data) == ["a.jpg", "dir with space/b.png", "c.jpg"]


def test_read_list_nul_separated_keeps_newlines_and_spaces_in_names():
    data = b"two\nlines.jpg\0 lead and trail .png \0\0plain.jpg\0"
    assert read_list(data, null=True) == ["two\nlines.jpg", " lead and trail .png ", "plain.jpg"]
    assert read_list(data) == ["two", "lines.jpg\0 lead and trail .png \0\0plain.jpg\0"]  # why -0 exists


def test_read_list_keeps_names_that_are_not_utf8():
    name = b"caf\xe9.jpg"  # Latin-1, as an old camera or archive may name it
    assert os.fsencode(read_list(name + b"\n")[0]) == name
    assert os.fsencode(read_list(name + b"\0", null=True)[0]) == name


def test_parse_shard_accepts_k_of_n():
    assert parse_shard("0/4") == (0, 4)
    assert parse_shard("3/4") == (3, 4)


@pytest.mark.parametrize("text", ["4/4", "-1/4", "a/b", "3", "0/0", "1/2/3", ""])
def test_parse_shard_rejects(text):
    with pytest.raises(UsageError, match="--shard"):
        parse_shard(text)


@pytest.mark.parametrize("n", range(1, 8))
def test_shards_partition_the_jobs(n):
    jobs = [Job(Path(f"/d/{i:02d}.jpg"), f"{i:02d}") for i in range(23)]
    slices = [shard(jobs, k, n) for k in range(n)]
    assert sorted((j for s in slices for j in s), key=lambda j: j.key) == jobs
    assert sum(len(s) for s in slices) == len(jobs)  # disjoint: nothing counted twice
    assert max(map(len, slices)) - min(map(len, slices)) <= 1
    assert slices == [shard(list(jobs), k, n) for k in range(n)]

"""The merged file system and its waste, member by member, against hand-computed values for
each OCI layer rule (whiteouts, opaque directories, same-layer entries, hardlinks, symlinked
parents, names climbing above the root)."""

from __future__ import annotations

from spotstart.image.tarscan import TarEntry
from spotstart.image.tree import MergedTree


def f(name: str, size: int) -> TarEntry:
    return TarEntry(name, "file", size)


def d(name: str) -> TarEntry:
    return TarEntry(name, "dir", 0)


def wasted(tree: MergedTree) -> dict[str, int]:
    return {w.path: w.size for w in tree.wasted}


def test_whiteout_hides_lower_layers_but_not_its_own() -> None:
    t = MergedTree()
    t.add(0, f("a/x", 100))
    t.add(0, f("a/y", 10))
    t.add(1, f("a/x", 7))  # same layer as the whiteout: stays, even though it comes first
    t.add(1, TarEntry("a/.wh.x", "file", 0))
    t.add(1, TarEntry("a/.wh.y", "file", 0))
    assert wasted(t) == {"/a/x": 100, "/a/y": 10}
    node = t.lookup("/a/x")
    assert node is not None and node.inode is not None and node.inode.size == 7
    assert t.lookup("/a/y") is None
    assert t.lookup("/a/.wh.y") is None  # a whiteout is not a file of the image


def test_opaque_directory_keeps_only_its_own_layer_below_it() -> None:
    t = MergedTree()
    t.add(0, f("d/old", 50))
    t.add(0, f("d/sub/deep", 60))
    t.add(1, f("d/sub/new", 5))
    t.add(1, TarEntry("d/.wh..wh..opq", "file", 0))
    assert wasted(t) == {"/d/old": 50, "/d/sub/deep": 60}
    assert t.lookup("/d/sub/new") is not None


def test_a_hardlinked_inode_is_wasted_only_when_its_last_name_goes() -> None:
    t = MergedTree()
    t.add(0, f("etc/a", 1000))
    t.add(0, TarEntry("etc/b", "hardlink", 0, "etc/a"))
    t.add(1, TarEntry("etc/.wh.a", "file", 0))
    assert wasted(t) == {}
    t.add(2, TarEntry("etc/.wh.b", "file", 0))
    assert wasted(t) == {"/etc/a": 1000}
    assert [w.layer for w in t.wasted] == [0]


def test_a_file_over_a_directory_hides_the_whole_subtree() -> None:
    t = MergedTree()
    t.add(0, f("opt/pkg/lib.so", 300))
    t.add(0, f("opt/pkg/data", 200))
    t.add(1, f("opt/pkg", 1))
    assert sum(wasted(t).values()) == 500


def test_parents_that_are_symlinks_are_followed_inside_the_root() -> None:
    t = MergedTree()
    t.add(0, d("usr/lib"))
    t.add(0, TarEntry("lib", "symlink", 0, "usr/lib"))
    t.add(0, TarEntry("abs", "symlink", 0, "/../../usr/lib"))
    t.add(1, f("lib/libx.so", 40))
    t.add(1, f("abs/liby.so", 30))
    assert t.lookup("/usr/lib/libx.so") is not None
    assert t.lookup("/usr/lib/liby.so") is not None
    t.add(2, TarEntry("usr/lib/.wh.libx.so", "file", 0))
    assert wasted(t) == {"/usr/lib/libx.so": 40}


def test_names_that_climb_above_the_root_stay_inside_it() -> None:
    t = MergedTree()
    t.add(0, f("../../../etc/passwd", 9))
    assert t.lookup("/etc/passwd") is not None
    assert t.notes.escaped_names == 1


def test_a_duplicate_in_a_later_layer_wastes_the_earlier_copy() -> None:
    t = MergedTree()
    t.add(0, f("w/model.bin", 4096))
    t.add(3, f("w/model.bin", 4096))
    assert [(w.layer, w.by, w.how) for w in t.wasted] == [(0, 3, "overwritten")]


def test_prefetch_checks_name_missing_paths_small_layers_and_lost_order() -> None:
    from spotstart.image.prefetch import check_against_image

    t = MergedTree()
    t.add(0, f("usr/lib/a.so", 10))
    t.add(1, f("app/b.py", 10))
    warnings = check_against_image(["/app/b.py", "/usr/lib/a.so", "/nope"], t, [50 << 20, 1 << 20])
    assert any("1 listed paths are not files" in w for w in warnings)
    assert any("layers 1 are under its 10 MiB zTOC minimum" in w for w in warnings)
    assert any("1 files will be read out of first-read order" in w for w in warnings)

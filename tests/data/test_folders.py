
import pytest
from PIL import Image

from tests.data.test_images import save
from transferkit.data.folders import index_folder, iter_image_files
from transferkit.errors import DataError


def make_tree(root):
    for name in ("b_dogs", "a_cats"):
        for index in range(3):
            save(Image.new("RGB", (8, 8)), root / name / f"{index}.png")
    (root / "a_cats" / ".DS_Store").write_bytes(b"litter")
    (root / "a_cats" / "Thumbs.db").write_bytes(b"litter")
    (root / "__MACOSX").mkdir()
    (root / "a_cats" / "notes.txt").write_text("hello")
    save(Image.new("RGB", (8, 8)), root / "b_dogs" / "puppies" / "deep.png")


def test_index_folder_sorts_classes_ignores_litter_and_lists_non_images(tmp_path):
    make_tree(tmp_path)
    index = index_folder(tmp_path)
    assert index.class_names == ("a_cats", "b_dogs")
    assert index.counts() == {"a_cats": 3, "b_dogs": 4}  # nested sub-folder counts for its class
    assert [path.name for path, _ in index.skipped] == ["notes.txt"]
    assert all(".DS_Store" not in str(path) and "Thumbs" not in str(path) for path in index.paths)


def test_symlink_loop_is_walked_once(tmp_path):
    make_tree(tmp_path)
    (tmp_path / "a_cats" / "loop").symlink_to(tmp_path / "a_cats", target_is_directory=True)
    files = [path for path, reason in iter_image_files(tmp_path / "a_cats") if reason is None]
    assert len(files) == 3


def test_a_class_folder_that_cannot_be_listed_is_told_so_not_called_empty(tmp_path, monkeypatch):
    import os

    make_tree(tmp_path)
    listing = os.scandir

    def refusing(path="."):
        if os.fspath(path) == os.fspath(tmp_path / "b_dogs"):
            raise PermissionError(13, "Permission denied")  # as for another user under chmod 000
        return listing(path)

    monkeypatch.setattr(os, "scandir", refusing)
    with pytest.raises(DataError, match=r"b_dogs cannot be read \(Permission denied\); give this user read"):
        index_folder(tmp_path)


def test_a_link_to_the_data_folder_inside_a_class_is_reported_not_walked(tmp_path):
    """Followed, it would bring every other class's images in under this class's name."""
    make_tree(tmp_path)
    (tmp_path / "a_cats" / "up").symlink_to(tmp_path, target_is_directory=True)
    index = index_folder(tmp_path)
    assert index.counts() == {"a_cats": 3, "b_dogs": 4}
    assert ("up", "a link to a folder above it (not followed)") in [(path.name, reason)
                                                                   for path, reason in index.skipped]


@pytest.mark.parametrize(
    "setup, fragment",
    [
        (lambda root: None, "does not exist"),
        (lambda root: root.write_text("x"), "is a file"),
        (lambda root: root.mkdir(), "no class sub-folders"),
        (lambda root: save(Image.new("RGB", (4, 4)), root / "only" / "a.png"), "only one class"),
        (lambda root: (save(Image.new("RGB", (4, 4)), root / "a" / "a.png"), (root / "b").mkdir()), "b in"),
    ],
    ids=["missing", "file", "empty", "one-class", "empty-class"],
)
def test_bad_folders_give_clear_errors(tmp_path, setup, fragment):
    root = tmp_path / "data"
    setup(root)
    with pytest.raises(DataError, match=fragment):
        index_folder(root)


def test_a_class_named_unknown_is_refused_as_the_label_of_no_known_class(tmp_path):
    for name in ("cat", "unknown"):
        (tmp_path / name).mkdir()
        Image.new("RGB", (8, 8)).save(tmp_path / name / "a.png")
    with pytest.raises(DataError, match=r"class folder .*unknown has the name transferkit gives images of no known "
                                        r"class .*; rename it, e\.g\. to unknown_class"):
        index_folder(tmp_path)


def test_the_cheap_class_check_refuses_what_indexing_refuses_in_the_same_words(tmp_path):
    """``check_class_folders`` (the command line's, before Keras loads) reads each class folder
    only up to its first image file, and says what ``index_folders`` would."""
    from transferkit.data.folders import check_class_folders, index_folders

    def write(root, classes):
        for name, count in classes.items():
            (root / name).mkdir(parents=True)
            for index in range(count):
                (root / name / f"{index}.png").write_bytes(b"not opened")
        return root

    cases = [(write(tmp_path / "one", {"a": 2}), None), (write(tmp_path / "empty", {"a": 2, "b": 0}), None),
             (write(tmp_path / "unknown", {"a": 2, "unknown": 1}), None),
             (write(tmp_path / "data", {"a": 2, "b": 2}), write(tmp_path / "val", {"a": 1, "c": 1}))]
    for data_dir, val_dir in cases:
        with pytest.raises(DataError) as indexed:
            index_folders(data_dir, val_dir)
        with pytest.raises(DataError) as checked:
            check_class_folders(data_dir, val_dir)
        assert str(checked.value) == str(indexed.value)
    check_class_folders(tmp_path / "data")  # two classes with images: nothing to say

"""Class trees in dataset metadata (HSSN): every registered tree is a valid tree for ClassTree,
PASCAL-Person-Part's tree and loader, Mapillary Vistas 2.0's tree derived from (a tiny fake)
config_v2.0.json, and the clear errors of the child -> parent form (cycle, missing class, two
roots, ...)."""

import json

import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog

import seg_methods  # noqa: F401  registers the datasets
from seg_methods.data.datasets.class_tables import hierarchy_from_keys, hierarchy_from_parent_map
from seg_methods.data.datasets.layout import DatasetLayoutError
from seg_methods.data.datasets.register_mapillary_vistas import (
    register_all_mapillary_vistas_v2,
    vistas_v2_metadata,
)
from seg_methods.data.datasets.register_pascal_person_part import (
    PASCAL_PERSON_PART_CLASSES,
    load_pascal_person_part,
)
from seg_methods.modeling.criterion.hssn import ClassTree

REGISTERED = [
    ("synthetic_sem_seg_train", [8, 4, 2]),
    ("cityscapes_fine_sem_seg_train", [19, 7]),
    ("mapillary_vistas_sem_seg_train", [65, 13, 7]),
    ("pascal_person_part_sem_seg_train", [7, 3, 2]),
    ("pascal_person_part_sem_seg_val", [7, 3, 2]),
]


def _check_tree(hierarchy, classes):
    """ClassTree accepts it, and its child -> parent form passes every tree check (no cycle,
    one root, every class present once and a leaf, one depth) and gives the same tree back."""
    tree = ClassTree(hierarchy, num_classes=len(classes))
    assert tree.names[0] == list(classes)
    parent_of = tree.parent_map()
    leaves = [f"0.{i}:{n}" for i, n in enumerate(tree.names[0])]
    again = ClassTree.from_parent_map(leaves, parent_of, num_classes=len(classes))
    assert again.parents == tree.parents and again.level_sizes == tree.level_sizes
    return tree


@pytest.mark.parametrize("name,sizes", REGISTERED, ids=[r[0] for r in REGISTERED])
def test_registered_trees_are_valid(name, sizes):
    meta = MetadataCatalog.get(name)
    tree = _check_tree(meta.class_hierarchy, meta.stuff_classes)
    assert tree.level_sizes == sizes


def test_pascal_person_part_tree_and_loader(tmp_path):
    meta = MetadataCatalog.get("pascal_person_part_sem_seg_train")
    tree = ClassTree(meta.class_hierarchy, num_classes=7)
    assert tuple(tree.names[0]) == PASCAL_PERSON_PART_CLASSES
    # background -> background -> background; head, torso, arms -> upper body -> person;
    # legs -> lower body -> person
    up = {n: tree.names[1][p] for n, p in zip(tree.names[0], tree.parents[0])}
    assert up == {
        "background": "background",
        "head": "upper body",
        "torso": "upper body",
        "upper arms": "upper body",
        "lower arms": "upper body",
        "upper legs": "lower body",
        "lower legs": "lower body",
    }
    top = {n: tree.names[2][p] for n, p in zip(tree.names[1], tree.parents[1])}
    assert top == {"background": "background", "upper body": "person", "lower body": "person"}
    assert meta.ignore_label == 255 and meta.evaluator_type == "sem_seg"
    # the data is not here: a clear error naming the missing folder
    with pytest.raises(DatasetLayoutError, match="pascal_person_part/JPEGImages"):
        DatasetCatalog.get("pascal_person_part_sem_seg_val")
    # the loader on a tiny fake layout
    root = tmp_path / "pascal_person_part"
    (root / "list").mkdir(parents=True)
    (root / "list" / "train_id.txt").write_text("2008_000003\n2008_000008\n\n")
    dicts = load_pascal_person_part(str(root), "train")
    assert [d["file_name"] for d in dicts] == [
        str(root / "JPEGImages" / "2008_000003.jpg"),
        str(root / "JPEGImages" / "2008_000008.jpg"),
    ]
    assert dicts[1]["sem_seg_file_name"] == str(root / "SegmentationPart" / "2008_000008.png")


# ----------------------------------------------------------------------------- Vistas 2.0
def _label(name, evaluate=True, readable=None):
    return {
        "name": name,
        "readable": readable or name.split("--")[-1].title(),
        "color": [1, 2, 3],
        "instances": False,
        "evaluate": evaluate,
    }


FAKE_V2 = [
    _label("animal--bird"),
    _label("construction--flat--road"),
    _label("construction--barrier--curb"),
    _label("construction--flat--sidewalk"),
    _label("marking--discrete--arrow--left"),
    _label("object--vehicle--car"),
    _label("void--unlabeled", evaluate=False),
]


def _write_config(folder, labels):
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "config_v2.0.json"
    path.write_text(json.dumps({"labels": labels, "version": "2.0"}))
    return str(path)


def test_vistas_v2_tree_is_derived_from_the_dataset_config(tmp_path):
    meta = vistas_v2_metadata(_write_config(tmp_path, FAKE_V2))
    assert meta["stuff_classes"] == ["Bird", "Road", "Curb", "Sidewalk", "Left", "Car"]
    assert meta["ignore_label"] == 6  # the label value of "void--unlabeled"
    h = meta["class_hierarchy"]
    assert h["names"][1] == [
        "animal",
        "construction--flat",
        "construction--barrier",
        "marking--discrete",  # a 4-component key: its first two components
        "object--vehicle",
    ]
    assert h["names"][2] == ["animal", "construction", "marking", "object"]
    assert h["parents"] == [[0, 1, 2, 1, 3, 4], [0, 1, 1, 2, 3]]
    _check_tree(h, meta["stuff_classes"])


@pytest.mark.parametrize(
    "labels,match",
    [
        ([_label("a--b", evaluate=False), _label("a--c")], "must be exactly one label, the last"),
        (FAKE_V2 + [_label("void--other", evaluate=False)], "must be exactly one label"),
        ([_label("a--b")], "must be exactly one label"),
        ([], "non-empty 'labels'"),
        ([{"readable": "x", "evaluate": False}], "hierarchical key 'name'"),
    ],
)
def test_vistas_v2_config_errors(tmp_path, labels, match):
    with pytest.raises(ValueError, match=match):
        vistas_v2_metadata(_write_config(tmp_path, labels))


@pytest.fixture
def fresh_v2_names():
    """Unregister the two Vistas 2.0 names for the test, re-register them as they were after."""
    names = [f"mapillary_vistas_v2_sem_seg_{split}" for split in ("train", "val")]
    saved = {}
    for name in names:
        meta = MetadataCatalog.get(name).as_dict()
        meta.pop("name")
        saved[name] = (DatasetCatalog[name], meta)
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    yield
    for name, (loader, meta) in saved.items():
        if name in DatasetCatalog.list():
            DatasetCatalog.remove(name)
        if name in MetadataCatalog.list():
            MetadataCatalog.remove(name)
        DatasetCatalog.register(name, loader)
        MetadataCatalog.get(name).set(**meta)


def test_vistas_v2_registered_without_the_dataset():
    """As registered here (no dataset): no class metadata, and the file is named."""
    meta = MetadataCatalog.get("mapillary_vistas_v2_sem_seg_val")
    assert meta.get("class_hierarchy", None) is None
    assert meta.classes_file.endswith("mapillary_vistas/config_v2.0.json")
    with pytest.raises(DatasetLayoutError, match="config_v2.0.json"):
        DatasetCatalog.get("mapillary_vistas_v2_sem_seg_val")


def test_vistas_v2_registration_reads_the_config_file(tmp_path, fresh_v2_names):
    """A user who has the dataset: the classes and the tree are read at registration."""
    base = tmp_path / "mapillary_vistas"
    _write_config(base, FAKE_V2)
    register_all_mapillary_vistas_v2(str(tmp_path))
    meta = MetadataCatalog.get("mapillary_vistas_v2_sem_seg_train")
    assert meta.ignore_label == 6 and len(meta.stuff_classes) == 6
    assert ClassTree(meta.class_hierarchy, num_classes=6).level_sizes == [6, 5, 4]
    assert meta.sem_seg_root == str(base / "training" / "v2.0" / "labels")


def test_vistas_v2_unsupported_config_is_reported_on_use_not_at_import(tmp_path, fresh_v2_names):
    base = tmp_path / "mapillary_vistas"
    _write_config(base, [_label("a--b", evaluate=False), _label("a--c")])
    for d in ("training/images", "training/v2.0/labels"):
        (base / d).mkdir(parents=True)
    register_all_mapillary_vistas_v2(str(tmp_path))  # does not raise
    assert (
        MetadataCatalog.get("mapillary_vistas_v2_sem_seg_train").get("stuff_classes", None) is None
    )
    with pytest.raises(ValueError, match="exactly one label"):
        DatasetCatalog.get("mapillary_vistas_v2_sem_seg_train")


def test_hierarchy_from_keys_mid_tokens_keeps_three_component_keys():
    keys = ["animal--bird", "construction--flat--road", "construction--flat--sidewalk"]
    assert hierarchy_from_keys(keys, mid_tokens=2) == hierarchy_from_keys(keys)


# ----------------------------------------------------------------------------- tree errors
PARENT_OF = {
    "a": "A",
    "b": "A",
    "c": "B",
    "A": "X",
    "B": "X",
    "X": None,
}


def test_parent_map_to_levels():
    h = hierarchy_from_parent_map(["a", "b", "c"], PARENT_OF)
    assert h == {"names": [["a", "b", "c"], ["A", "B"]], "parents": [[0, 0, 1]]}
    # the root may also be left out of the keys
    no_root_key = {k: v for k, v in PARENT_OF.items() if k != "X"}
    assert hierarchy_from_parent_map(["a", "b", "c"], no_root_key) == h
    tree = ClassTree.from_parent_map(["a", "b", "c"], PARENT_OF, num_classes=3)
    assert tree.level_sizes == [3, 2]


@pytest.mark.parametrize(
    "classes,change,match",
    [
        (["a", "b", "c"], {"A": "B", "B": "A"}, r"cycle (A -> B -> A|B -> A -> B)"),
        (["a", "b", "c"], {"X": "a"}, "cycle"),  # through a class, no root left
        (["a", "b", "c", "d"], {}, r"classes \['d'\] are missing"),
        (["a", "b", "c"], {"B": None}, r"2 roots \['B', 'X'\]"),
        (["a", "b", "c"], {"c": "Y"}, r"2 roots \['X', 'Y'\]"),
        (["a", "b", "c", "A"], {}, r"classes \['A'\] have children"),
        (["a", "b"], {}, r"leaves \['c'\] are not classes"),
        (["a", "b", "c", "d"], {"d": "X"}, "different depths"),
        (["a", "a", "c"], {}, "duplicate classes"),
    ],
)
def test_parent_map_errors(classes, change, match):
    parent_of = {**PARENT_OF, **change}
    with pytest.raises(ValueError, match=match):
        hierarchy_from_parent_map(classes, parent_of)
    with pytest.raises(ValueError, match="class_hierarchy \\(my tree\\)"):
        ClassTree.from_parent_map(classes, parent_of, source="my tree")

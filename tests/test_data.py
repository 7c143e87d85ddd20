"""Data sources, splits and transforms, on small fixtures written into tmp_path."""

import csv
import json
import os
import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from mmdistill.data import SOURCE_FLIP_SAFE, SOURCES, Split, build_splits, clean_caption, emoji, load_image, shapes
from mmdistill.data.transforms import (
    CLIP_MEAN,
    CLIP_STD,
    ImageDataset,
    SpecRandAugment,
    augment_batch,
    build_transform,
    pixel_tensor,
)
from mmdistill.errors import UserError


def config(source, root=None, **overrides):
    fields = dict(source=source, root=None if root is None else str(root), image_size=16, seed=0)
    return SimpleNamespace(**{**fields, **overrides})


def check_links(split: Split, captions_per_image=None):
    """img2txt and txt2img are inverse maps covering every caption and image once."""
    assert len(split.txt2img) == len(split.captions)
    assert sorted(t for ids in split.img2txt for t in ids) == list(range(len(split.captions)))
    for i, ids in enumerate(split.img2txt):
        assert ids and all(split.txt2img[t] == i for t in ids)
        if captions_per_image:
            assert len(ids) == captions_per_image
    n_images = split.images.shape[0] if isinstance(split.images, torch.Tensor) else len(split.images)
    assert len(split) == n_images


def write_png(path, size=(6, 5), mode="RGB", value=120):
    path.parent.mkdir(parents=True, exist_ok=True)
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    pixels = np.full((size[1], size[0], channels), value, np.uint8)
    Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels, mode).save(path)


def write_json(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


# ---- captions, registry, images -----------------------------------------------------------------------------------


def test_clean_caption_follows_spec():
    assert clean_caption('A Dog (running)!  on "grass";\tfast~ #1:*  ') == "a dog running on grass fast 1"
    assert clean_caption("one, two. three-four") == "one, two three-four"
    assert clean_caption(" ".join(f"w{i}" for i in range(40))) == " ".join(f"w{i}" for i in range(30))
    assert clean_caption("a b c d", max_words=2) == "a b"


def test_registry_and_unknown_source():
    assert set(SOURCES) == {"shapes", "emoji", "flickr30k", "coco", "cc3m", "folder", "hf"}
    assert set(SOURCE_FLIP_SAFE) == set(SOURCES)
    assert SOURCE_FLIP_SAFE["shapes"] is False and SOURCE_FLIP_SAFE["flickr30k"] is True
    with pytest.raises(UserError, match="unknown data source 'nope'"):
        build_splits(config("nope"))


def test_load_image_converts_to_rgb_and_names_bad_files(tmp_path):
    write_png(tmp_path / "grey.png", mode="L", value=90)
    write_png(tmp_path / "alpha.png", mode="RGBA", value=200)
    (tmp_path / "corrupt.jpg").write_bytes(b"not an image")
    paths = [str(tmp_path / name) for name in ("grey.png", "alpha.png", "corrupt.jpg", "missing.png")]
    split = Split("test", ["a", "b", "c", "d"], [0, 1, 2, 3], [[0], [1], [2], [3]], paths)
    for i, value in [(0, 90), (1, 200)]:
        image = load_image(split, i)
        assert image.dtype == torch.uint8 and image.shape == (3, 5, 6) and (image == value).all()
    with pytest.raises(UserError, match=re.escape(paths[2])):
        load_image(split, 2)
    with pytest.raises(UserError, match=re.escape(paths[3])):
        load_image(split, 3)


# ---- shapes -------------------------------------------------------------------------------------------------------


SHAPES_SIZES = dict(train_images=300, val_images=20, test_images=100)


@pytest.fixture(scope="module")
def shapes_splits():
    return build_splits(config("shapes", **SHAPES_SIZES))


def test_shapes_splits(shapes_splits):
    assert list(shapes_splits) == ["train", "validation", "test"]
    for name, key in [("train", "train_images"), ("validation", "val_images"), ("test", "test_images")]:
        split = shapes_splits[name]
        assert split.name == name and len(split) == SHAPES_SIZES[key]
        assert split.images.dtype == torch.uint8 and split.images.shape[1:] == (3, 16, 16)
        check_links(split, captions_per_image=5)
        assert all(caption == clean_caption(caption) for caption in split.captions)
        for ids in split.img2txt:  # five varied captions per image
            assert len({split.captions[t] for t in ids}) == 5


def test_shapes_is_deterministic_by_seed(shapes_splits):
    again = build_splits(config("shapes", **SHAPES_SIZES))
    other = build_splits(config("shapes", seed=1, **SHAPES_SIZES))
    for name in ("train", "validation", "test"):
        assert torch.equal(again[name].images, shapes_splits[name].images)
        assert again[name].captions == shapes_splits[name].captions
        assert again[name].fingerprint() == shapes_splits[name].fingerprint()
        assert not torch.equal(other[name].images, shapes_splits[name].images)
        assert other[name].captions != shapes_splits[name].captions
        assert other[name].fingerprint() != shapes_splits[name].fingerprint()


def test_shapes_test_scenes_are_distinct_and_unseen_in_train():
    rng = np.random.default_rng(0)
    test = shapes.draw_scenes(rng, 1000, set(), distinct=True)
    train = shapes.draw_scenes(rng, 4000, set(test), distinct=False)
    assert len(set(test)) == len(test) == 1000
    assert not set(train) & set(test)


def test_shapes_captions_need_composition(shapes_splits):
    """Every colour comes with many kinds and every kind with many colours; captions use relations and counts."""
    captions = shapes_splits["train"].captions
    text = " ".join(captions)
    for colour in shapes.COLOURS:
        kinds = {kind for kind in shapes.KINDS if re.search(rf"\b{colour} {kind}", text)}
        assert len(kinds) >= 5, colour
    for kind in shapes.KINDS:
        colours = {colour for colour in shapes.COLOURS if re.search(rf"\b{colour} {kind}", text)}
        assert len(colours) >= 6, kind
    for words in ("left of", "right of", "above", "below", "two ", "three "):
        assert any(words in caption for caption in captions), words


def test_shapes_pictures_match_captions():
    """A red shape said to be on the left is drawn on the left, a blue one on the right."""
    red, blue = shapes.Shape("circle", "red", "big"), shapes.Shape("square", "blue", "big")
    scene = shapes.Scene("pair", "pair-h", (red, blue))
    image = shapes.render_scenes([scene], 32, np.random.default_rng(0))[0].int()
    left, right = image[:, 16, 8], image[:, 16, 24]
    assert left[0] > 150 and left[2] < 100
    assert right[2] > 150 and right[0] < 100
    caption = shapes.scene_captions(scene, np.random.default_rng(0), 7)
    assert any(c.startswith(("a big red", "a large red")) and "left of" in c for c in caption)


def test_shapes_rejects_bad_sizes():
    with pytest.raises(UserError, match="captions_per_image"):
        build_splits(config("shapes", captions_per_image=9, **SHAPES_SIZES))


# ---- emoji --------------------------------------------------------------------------------------------------------


@pytest.mark.skipif(
    not os.path.isfile(emoji.FONT_PATH),
    reason="Debian's fonts-noto-color-emoji is not installed: `make setup` installs it as root or with sudo",
)
def test_emoji_splits():
    splits = build_splits(config("emoji"))
    names, pixels = emoji.render_all(16)
    assert len(names) > 1000 and len(set(names)) == len(names)
    assert sum(len(split) for split in splits.values()) == len(names)
    assert len(splits["test"]) == round(0.15 * len(names))
    for split in splits.values():
        check_links(split, captions_per_image=5)
        assert split.images.shape[1:] == (3, 16, 16)
    assert "grinning face" in splits["train"].captions + splits["validation"].captions + splits["test"].captions
    assert "an emoji of a grinning face" in " | ".join(c for s in splits.values() for c in s.captions)
    again, other = build_splits(config("emoji")), build_splits(config("emoji", seed=3))
    assert again["test"].captions == splits["test"].captions
    assert other["test"].captions != splits["test"].captions
    assert SOURCE_FLIP_SAFE["emoji"] is False


def test_emoji_without_font_says_what_to_install(monkeypatch):
    monkeypatch.setattr(emoji, "FONT_PATH", "/nonexistent/NotoColorEmoji.ttf")
    with pytest.raises(UserError, match="fonts-noto-color-emoji"):
        emoji.render_all(9)


# ---- flickr30k / coco -------------------------------------------------------------------------------------------


def make_karpathy(root, prefix, annotation_dir="annotations"):
    """Train: one entry per caption (interleaved images); val/test: one entry per image with a caption list."""
    for name in ("a.png", "b.png", "c.png", "d.png"):
        write_png(root / "images" / name)
    train = [
        {"image": "images/a.png", "caption": "A Dog.", "image_id": "0"},
        {"image": "images/b.png", "caption": "a cat", "image_id": "1"},
        {"image": "images/a.png", "caption": "the (big) dog", "image_id": "0"},
        {"image": "images/c.png", "caption": "a bird", "image_id": "2"},
    ]
    evaluation = [
        {"image": "images/d.png", "caption": ["one", "two!"]},
        {"image": "images/a.png", "caption": ["three", "four", "five"]},
    ]
    files = {
        "flickr30k": ("flickr30k_train.json", "flickr30k_val.json", "flickr30k_test.json"),
        "coco": ("coco_karpathy_train.json", "coco_karpathy_val.json", "coco_karpathy_test.json"),
    }[prefix]
    write_json(root / annotation_dir / files[0], train)
    write_json(root / annotation_dir / files[1], evaluation)
    write_json(root / annotation_dir / files[2], evaluation)
    return root / annotation_dir


def test_flickr30k_groups_captions_in_file_order(tmp_path):
    make_karpathy(tmp_path, "flickr30k")
    splits = build_splits(config("flickr30k", tmp_path))
    train = splits["train"]
    assert train.captions == ["a dog", "a cat", "the big dog", "a bird"]
    assert train.txt2img == [0, 1, 0, 2] and train.img2txt == [[0, 2], [1], [3]]
    assert train.images == [str(tmp_path / "images" / n) for n in ("a.png", "b.png", "c.png")]
    test = splits["test"]
    assert test.captions == ["one", "two", "three", "four", "five"] and test.img2txt == [[0, 1], [2, 3, 4]]
    for split in splits.values():
        check_links(split)
    assert load_image(train, 1).shape == (3, 5, 6)
    assert pixel_tensor(test, 8, CLIP_MEAN, CLIP_STD).shape == (2, 3, 8, 8)
    assert train.fingerprint() == build_splits(config("flickr30k", tmp_path))["train"].fingerprint()
    assert train.fingerprint() != splits["validation"].fingerprint()


def test_coco_with_annotations_in_root_and_separate_image_root(tmp_path):
    make_karpathy(tmp_path / "data", "coco", annotation_dir="")
    splits = build_splits(config("coco", tmp_path / "data", image_root=str(tmp_path / "data")))
    assert splits["validation"].images[0] == str(tmp_path / "data" / "images" / "d.png")
    assert len(splits["train"]) == 3


def test_karpathy_bad_inputs_name_the_file(tmp_path):
    with pytest.raises(UserError, match=re.escape(str(tmp_path / "missing"))):
        build_splits(config("flickr30k", tmp_path / "missing"))
    with pytest.raises(UserError, match="data.root"):
        build_splits(config("flickr30k"))
    annotations = make_karpathy(tmp_path, "flickr30k")
    (annotations / "flickr30k_val.json").unlink()
    with pytest.raises(UserError, match="flickr30k_val.json"):
        build_splits(config("flickr30k", tmp_path))
    write_json(annotations / "flickr30k_val.json", [{"image": "a.png", "caption": ["x"]}, {"image": "b.png"}])
    with pytest.raises(UserError, match=r"flickr30k_val\.json: entry 1: missing key 'caption'"):
        build_splits(config("flickr30k", tmp_path))
    write_json(annotations / "flickr30k_val.json", [{"image": "a.png", "caption": []}])
    with pytest.raises(UserError, match=r"flickr30k_val\.json: entry 0"):
        build_splits(config("flickr30k", tmp_path))
    (annotations / "flickr30k_val.json").write_text('[{"image": "a.png",\n "caption": ["x"],,}]')
    with pytest.raises(UserError, match=r"flickr30k_val\.json:2: invalid JSON"):
        build_splits(config("flickr30k", tmp_path))


# ---- cc3m ---------------------------------------------------------------------------------------------------------


def make_llava_chat(root, count=30):
    entries = []
    for i in range(count):
        write_png(root / "images" / f"GCC_{i:03d}.png", value=i)
        entries.append(
            {
                "id": f"GCC_{i:03d}",
                "image": f"GCC_{i:03d}.png",
                "conversations": [
                    {"from": "human", "value": "Describe the image briefly.\n<image>"},
                    {"from": "gpt", "value": f"Caption number {i}."},
                ],
            }
        )
    write_json(root / "chat.json", entries)


def test_cc3m_chat_json_is_split_by_seed(tmp_path):
    make_llava_chat(tmp_path)
    splits = build_splits(config("cc3m", tmp_path))
    assert [len(splits[name]) for name in ("train", "validation", "test")] == [24, 3, 3]
    all_images = [path for split in splits.values() for path in split.images]
    assert len(set(all_images)) == 30
    for split in splits.values():
        check_links(split, captions_per_image=1)
        for caption, path in zip(split.captions, split.images):
            assert caption == f"caption number {int(path[-7:-4])}"
    assert load_image(splits["test"], 0).shape == (3, 5, 6)
    assert build_splits(config("cc3m", tmp_path))["test"].images == splits["test"].images
    assert build_splits(config("cc3m", tmp_path, seed=5))["test"].images != splits["test"].images
    sized = build_splits(config("cc3m", tmp_path, train_images=10, val_images=2, test_images=4))
    assert [len(sized[name]) for name in ("train", "validation", "test")] == [10, 2, 4]


def test_cc3m_split_files_and_metadata(tmp_path):
    for name, count in [("train", 4), ("val", 2), ("test", 5)]:
        write_json(
            tmp_path / "Annotation" / f"cc3m_captions_{name}.json",
            [{"image": f"{name}/{i}.jpg", "caption": f"{name} {i}"} for i in range(count)],
        )
    splits = build_splits(config("cc3m", tmp_path, test_images=3))
    assert splits["train"].captions == ["train 0", "train 1", "train 2", "train 3"]
    assert splits["test"].captions == ["test 0", "test 1", "test 2"]
    assert splits["validation"].images[1] == str(tmp_path / "val" / "1.jpg")

    plain = tmp_path / "plain"
    write_json(plain / "metadata.json", [{"image": f"{i}.jpg", "caption": f"c {i}"} for i in range(20)])
    assert [len(s) for s in build_splits(config("cc3m", plain)).values()] == [16, 2, 2]


def test_cc3m_bad_inputs_name_the_file(tmp_path):
    with pytest.raises(UserError, match="chat.json"):
        build_splits(config("cc3m", tmp_path))
    make_llava_chat(tmp_path, count=3)
    entries = json.loads((tmp_path / "chat.json").read_text())
    entries[1]["conversations"] = [{"from": "human", "value": "hi"}]
    write_json(tmp_path / "chat.json", entries)
    with pytest.raises(UserError, match=r"chat\.json: entry 1: no 'gpt' turn"):
        build_splits(config("cc3m", tmp_path))
    make_llava_chat(tmp_path, count=3)
    with pytest.raises(UserError, match=r"chat\.json: 3 images cannot be split"):
        build_splits(config("cc3m", tmp_path))


# ---- folder -------------------------------------------------------------------------------------------------------


def make_folder(root):
    for split in ("train", "val", "test"):
        for name in ("x.png", "y.png"):
            write_png(root / split / name, mode="L")
    train = [{"file_name": "x.png", "text": "An X"}, {"file_name": "y.png", "text": ["a Y", "why: y"]}]
    (root / "train" / "metadata.jsonl").write_text("\n".join(json.dumps(row) for row in train) + "\n\n")
    with open(root / "val" / "metadata.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerows([["file_name", "text"], ["x.png", "plain caption"], ["y.png", '["first", "second"]']])
    (root / "test" / "metadata.jsonl").write_text(json.dumps({"file_name": "y.png", "text": "test y"}) + "\n")


def test_folder_reads_jsonl_and_csv(tmp_path):
    make_folder(tmp_path)
    splits = build_splits(config("folder", tmp_path))
    assert splits["train"].captions == ["an x", "a y", "why y"] and splits["train"].img2txt == [[0], [1, 2]]
    assert splits["validation"].captions == ["plain caption", "first", "second"]
    assert splits["validation"].images[0] == str(tmp_path / "val" / "x.png")
    assert splits["test"].images == [str(tmp_path / "test" / "y.png")]
    for split in splits.values():
        check_links(split)
    assert load_image(splits["test"], 0).shape == (3, 5, 6)


def test_folder_bad_inputs_name_file_and_line(tmp_path):
    make_folder(tmp_path)
    metadata = tmp_path / "train" / "metadata.jsonl"
    metadata.write_text('{"file_name": "x.png", "text": "ok"}\n\n{"file_name": "y.png", "text": \n')
    with pytest.raises(UserError, match=re.escape(f"{metadata}:3: invalid JSON")):
        build_splits(config("folder", tmp_path))
    metadata.write_text('{"file_name": "x.png", "text": "ok"}\n{"file_name": "y.png"}\n')
    with pytest.raises(UserError, match=re.escape(f"{metadata}:2: missing key 'text'")):
        build_splits(config("folder", tmp_path))
    # an empty caption (here one of a list) is refused, not trained on
    metadata.write_text('{"file_name": "x.png", "text": "ok"}\n{"file_name": "y.png", "text": ["fine", " ... "]}\n')
    with pytest.raises(UserError, match=re.escape(f"{metadata}:2: empty caption")):
        build_splits(config("folder", tmp_path))
    with open(tmp_path / "val" / "metadata.csv", "w", newline="") as f:
        csv.writer(f).writerows([["file_name", "caption"], ["x.png", "c"]])
    metadata.write_text('{"file_name": "x.png", "text": "ok"}\n')
    with pytest.raises(UserError, match=re.escape(f"{tmp_path / 'val' / 'metadata.csv'}:2: missing key 'text'")):
        build_splits(config("folder", tmp_path))
    (tmp_path / "val" / "metadata.csv").unlink()  # a split folder without metadata: the split is carved
    metadata.write_text('{"file_name": "x.png", "text": "ok"}\n{"file_name": "y.png", "text": "ok too"}\n')
    assert build_splits(config("folder", tmp_path))["validation"].origin.startswith("carved from train")


def write_flat_folder(root, images=20, captions_per_image=1, csv_file=True):
    """A user's one folder: metadata.csv (file_name,text) at the root, images in nested folders below img/."""
    rows = []
    for i in range(images):
        name = f"img/{'ab'[i % 2]}/{i:03d}.png"
        write_png(root / name, value=10 * i % 250)
        rows += [[name, f"picture number {i} variant {c}"] for c in range(captions_per_image)]
    if csv_file:
        with open(root / "metadata.csv", "w", newline="") as f:
            csv.writer(f).writerows([["file_name", "text"], *rows])
    else:
        (root / "metadata.jsonl").write_text("".join(json.dumps({"file_name": n, "text": t}) + "\n" for n, t in rows))


def test_folder_flat_csv_carves_validation_and_test_by_seed(tmp_path):
    write_flat_folder(tmp_path, images=20, captions_per_image=2)
    splits = build_splits(config("folder", tmp_path, val_images=3, test_images=0, test_fraction=0.25))
    assert [len(splits[n]) for n in ("train", "validation", "test")] == [12, 3, 5]
    paths = [p for s in splits.values() for p in s.images]
    assert len(set(paths)) == 20 and all(os.path.isfile(p) for p in paths)  # disjoint, nested folders resolved
    for split in splits.values():
        check_links(split, captions_per_image=2)  # repeated file_name rows: one image, both captions
    assert splits["train"].origin == f"{tmp_path / 'metadata.csv'}, less the carved images"
    assert splits["test"].origin == "carved from train: 5 of 20 images, seed 0"
    again = build_splits(config("folder", tmp_path, val_images=3, test_images=0, test_fraction=0.25))
    assert again["test"].images == splits["test"].images  # the same seed carves the same images
    other = build_splits(config("folder", tmp_path, val_images=3, test_images=0, test_fraction=0.25, seed=1))
    assert other["test"].images != splits["test"].images
    with pytest.raises(UserError, match="cannot give 15 validation, 6 test images"):
        build_splits(config("folder", tmp_path, val_images=15, test_images=6))


def test_folder_split_aliases_and_jsonl_at_the_root(tmp_path):
    write_flat_folder(tmp_path / "training", images=10, csv_file=False)
    write_flat_folder(tmp_path / "dev", images=4)
    splits = build_splits(config("folder", tmp_path, val_fraction=0.1, test_fraction=0.2))
    assert [len(splits[n]) for n in ("train", "validation", "test")] == [8, 4, 2]
    assert splits["validation"].origin == str(tmp_path / "dev" / "metadata.csv")
    assert splits["train"].images[0].startswith(str(tmp_path / "training" / "img"))
    write_flat_folder(tmp_path / "flat", images=10, csv_file=False)
    assert len(build_splits(config("folder", tmp_path / "flat", val_fraction=0.1, test_fraction=0.1))["train"]) == 8


@pytest.mark.parametrize("layout", ["missing", "empty", "no-train"])
def test_folder_layout_errors_show_the_layout_and_a_command(tmp_path, layout):
    root = tmp_path / "data"
    if layout != "missing":
        root.mkdir()
    if layout == "no-train":
        write_flat_folder(root / "test", images=2)
    with pytest.raises(UserError) as err:
        build_splits(config("folder", root))
    message = str(err.value)
    assert "\n" not in message and f"{root}/metadata.csv (columns file_name,text" in message
    assert f"mmdistill run --preset shapes-100 --set data.source=folder --set data.root={root}" in message
    assert {
        "missing": "data root not found",
        "empty": "no metadata.csv or metadata.jsonl in",
        "no-train": "has test split folders but no train/",
    }[layout] in message


# ---- transforms ---------------------------------------------------------------------------------------------------


def test_transforms_output_normalised_floats(shapes_splits):
    image = shapes_splits["train"].images[0]
    for augment in ("clip", "crop", "none"):
        out = build_transform(24, CLIP_MEAN, CLIP_STD, augment, flip=False)(image)
        assert out.dtype == torch.float32 and out.shape == (3, 24, 24) and torch.isfinite(out).all()
    test = build_transform(24, CLIP_MEAN, CLIP_STD, "none")
    assert torch.equal(test(image), test(image))
    assert set(SpecRandAugment._AUGMENTATION_SPACE) == {
        "Identity",
        "AutoContrast",
        "Brightness",
        "Sharpness",
        "Equalize",
        "ShearX",
        "ShearY",
        "TranslateX",
        "TranslateY",
        "Rotate",
    }
    with pytest.raises(ValueError):
        build_transform(24, CLIP_MEAN, CLIP_STD, "mixup")


def test_pixel_tensor_and_dataset(shapes_splits):
    split = shapes_splits["validation"]
    pixels = pixel_tensor(split, 16, CLIP_MEAN, CLIP_STD)
    assert pixels.shape == (len(split), 3, 16, 16) and pixels.dtype == torch.float32
    expected = (split.images[3].float() / 255 - torch.tensor(CLIP_MEAN)[:, None, None]) / torch.tensor(CLIP_STD)[
        :, None, None
    ]
    assert torch.allclose(pixels[3], expected, atol=1e-5)
    dataset = ImageDataset(split, build_transform(16, CLIP_MEAN, CLIP_STD, "none"))
    image, index = dataset[3]
    assert len(dataset) == len(split) and index == 3 and torch.allclose(image, pixels[3])


def test_augment_batch_is_deterministic_per_generator(shapes_splits):
    pixels = shapes_splits["validation"].images.float() / 255
    first = augment_batch(pixels, 12, torch.Generator().manual_seed(1), flip=True)
    again = augment_batch(pixels, 12, torch.Generator().manual_seed(1), flip=True)
    other = augment_batch(pixels, 12, torch.Generator().manual_seed(2), flip=True)
    assert first.shape == (len(pixels), 3, 12, 12) and first.dtype == torch.float32
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert first.min() >= 0 and first.max() <= 1
    unflipped = augment_batch(pixels, 12, torch.Generator().manual_seed(1), flip=False)
    assert unflipped.shape == first.shape


def test_prepare_decodes_every_image_file_once(tmp_path, monkeypatch):
    """A corrupt or missing file stops `prepare` with its name, not a DataLoader worker of a later stage; files
    already decoded are recognised by size and mtime."""
    from mmdistill import prepare as prepare_module

    make_folder(tmp_path)
    splits = build_splits(config("folder", tmp_path))
    decoded = []
    real = prepare_module.decode_image
    monkeypatch.setattr(prepare_module, "decode_image", lambda path: decoded.append(path) or real(path))
    prepare_module.verify_images(splits, tmp_path / "cache")
    assert len(decoded) == 5  # x, y in train and val; y in test
    prepare_module.verify_images(splits, tmp_path / "cache")
    assert len(decoded) == 5  # nothing changed: nothing decoded again
    bad = tmp_path / "val" / "y.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(UserError, match=re.escape(f"cannot decode image {bad}")):
        prepare_module.verify_images(splits, tmp_path / "cache")
    assert decoded[5:] == [str(bad)]
    bad.unlink()
    with pytest.raises(UserError, match=re.escape(f"image file not found: {bad}")):
        prepare_module.verify_images(splits, tmp_path / "cache")

import json
from pathlib import Path

import pytest

from cliplab.data import load_caption_dataset, read_coco, read_flickr8k, read_karpathy, read_pairs
from cliplab.errors import DataError
from tests.conftest import make_image


@pytest.fixture()
def flickr_dir(tmp_path):
    (tmp_path / "images").mkdir()
    names = [f"{i}_abc.jpg" for i in range(4)]
    for i, n in enumerate(names):
        make_image(tmp_path / "images" / n, "red", "circle", seed=i)
    lines = ["image,caption"]
    token = []
    for i, n in enumerate(names):
        for k in range(5):
            cap = f"caption {k}, of image {i}"
            lines.append(f'{n},"{cap}"')
            token.append(f"{n}#{k}\t{cap}")
    (tmp_path / "captions.txt").write_text("\n".join(lines) + "\n")
    (tmp_path / "Flickr8k.token.txt").write_text("\n".join(token) + "\n")
    (tmp_path / "Flickr_8k.trainImages.txt").write_text("\n".join(names[:2]) + "\n")
    (tmp_path / "Flickr_8k.devImages.txt").write_text(names[2] + "\n")
    (tmp_path / "Flickr_8k.testImages.txt").write_text(names[3] + "\n")
    return tmp_path


def test_flickr8k_csv_and_token_agree(flickr_dir):
    ds = read_flickr8k(flickr_dir, "train")
    assert ds.num_images == 2 and ds.num_captions == 10
    assert ds.captions[0] == "caption 0, of image 0"  # quoted CSV field with a comma
    assert ds.captions_of(1) == [5, 6, 7, 8, 9]
    (flickr_dir / "captions.txt").unlink()
    ds2 = read_flickr8k(flickr_dir, "train")
    assert ds2.captions == ds.captions and ds2.images == ds.images
    assert read_flickr8k(flickr_dir, "all").num_images == 4
    assert read_flickr8k(flickr_dir, "test").images == ["3_abc.jpg"]


def test_coco_and_karpathy(tmp_path):
    for i in range(3):
        make_image(tmp_path / f"c{i}.jpg", "blue", "square", seed=i)
    coco = {"images": [{"id": 10 + i, "file_name": f"c{i}.jpg"} for i in range(3)],
            "annotations": [{"image_id": 10 + i % 3, "caption": f"cap {i}"} for i in range(7)]}
    (tmp_path / "coco.json").write_text(json.dumps(coco))
    ds = read_coco(tmp_path / "coco.json", tmp_path, "all")
    assert ds.num_images == 3 and ds.num_captions == 7
    assert [ds.images[j] for j in ds.caption_image[:4]] == ["c0.jpg", "c1.jpg", "c2.jpg", "c0.jpg"]
    karpathy = {"images": [{"filename": f"c{i}.jpg", "filepath": "", "split": s,
                            "sentences": [{"raw": f"s{i}a"}, {"raw": f"s{i}b"}]}
                           for i, s in enumerate(["train", "val", "test"])]}
    (tmp_path / "dataset_x.json").write_text(json.dumps(karpathy))
    assert read_karpathy(tmp_path / "dataset_x.json", tmp_path, "dev").captions == ["s1a", "s1b"]
    auto = load_caption_dataset(tmp_path / "dataset_x.json", "test")
    assert auto.images == ["c2.jpg"]
    assert load_caption_dataset(tmp_path / "coco.json", "all").num_captions == 7
    # COCO layouts: images in images/ beside the JSON, or annotations/captions_X.json beside X/
    for images_dir, json_path in (("mini/images", "mini/captions_train2017.json"),
                                  ("coco/val2017", "coco/annotations/captions_val2017.json")):
        (tmp_path / images_dir).mkdir(parents=True)
        (tmp_path / json_path).parent.mkdir(parents=True, exist_ok=True)
        for i in range(3):
            make_image(tmp_path / images_dir / f"c{i}.jpg", "blue", "square", seed=i)
        (tmp_path / json_path).write_text(json.dumps(coco))
        ds = load_caption_dataset(tmp_path / json_path, "all")
        assert ds.image_root == tmp_path / images_dir and all(p.is_file() for p in map(Path, ds.image_paths()))


def test_generic_csv_jsonl(caption_dir, tmp_path):
    ds = read_pairs(caption_dir / "captions.csv")
    assert ds.num_images == 16 and ds.num_captions == 40
    rows = [{"image": "images/img00.jpg", "caption": "x", "split": "train"},
            {"image": "images/img01.jpg", "caption": "y", "split": "val"}]
    jl = caption_dir / "pairs.jsonl"
    jl.write_text("\n".join(json.dumps(r) for r in rows))
    assert read_pairs(jl, split="dev").captions == ["y"]
    from cliplab.data.captions import _hash_split

    # the split column selects rows; without one, image names hash 90/5/5
    assert read_pairs(caption_dir / "captions.csv", split="test").num_images == 4
    no_split = tmp_path / "no_split.csv"
    no_split.write_text("".join(",".join(ln.split(",")[:2]) + "\n"
                                for ln in (caption_dir / "captions.csv").read_text().splitlines()))
    train = read_pairs(no_split, image_root=caption_dir, split="train")
    assert train.images == [im for im in ds.images if _hash_split(im) == "train"]
    assert 10 <= train.num_images < 16


def test_errors_name_file_and_line(caption_dir, tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("image,caption\n" f"{caption_dir}/images/img00.jpg,ok\n" f"{caption_dir}/images/img01.jpg,   \n")
    with pytest.raises(DataError, match=r"bad.csv:3: empty caption for image"):
        read_pairs(bad)
    bad.write_text("image,caption\n" f"{caption_dir}/images/img00.jpg,ok\n" "nowhere/missing.jpg,hello\n")
    with pytest.raises(DataError, match=r"bad.csv:3: image not found: .*missing.jpg"):
        read_pairs(bad)
    ds = read_pairs(bad, on_error="skip")
    assert len(ds.skipped) == 1 and ds.num_images == 1
    bad.write_text("img,text\na,b\n")
    with pytest.raises(DataError, match="missing column 'image'"):
        read_pairs(bad)
    with pytest.raises(DataError, match="dataset not found"):
        load_caption_dataset(tmp_path / "nope.csv")
    with pytest.raises(DataError, match="unknown split"):
        read_pairs(caption_dir / "captions.csv", split="validation-ish")


def test_drop_images_remaps_captions(caption_dir):
    ds = read_pairs(caption_dir / "captions.csv")
    dropped = ds.drop_images([0, 5], "corrupt image", ["a", "b"])
    assert dropped.num_images == 14 and len(dropped.skipped) == 2
    for c, i in enumerate(dropped.caption_image):
        assert dropped.images[i] in ds.images
        orig = ds.images.index(dropped.images[i])
        assert dropped.captions[c] in [ds.captions[k] for k in ds.captions_of(orig)]

"""Class names from folder names are readable in prompts (CLIP papers' rule); the dataset keeps the folder names."""

from __future__ import annotations

from pathlib import Path

import pytest

from cascadevlm.cli import run_evaluate as main
from cascadevlm.clip.zero_shot import build_zero_shot_head
from cascadevlm.data.datamodule import CascadeDataModule
from cascadevlm.data.names import readable_class_name, readable_class_names
from cascadevlm.records import read_records
from cascadevlm.testing.images import sample_photos

FAKE = "cascadevlm.testing.fake_lvlm.FakeLVLM"
FOLDERS = {"001.Black_footed_Albatross": ["chelsea", "horse"], "002.Laysan_Albatross": ["coffee", "rocket"],
           "n02085620-Chihuahua": ["astronaut", "coins"]}  # fmt: skip
READABLE = ["Black footed Albatross", "Laysan Albatross", "Chihuahua"]


@pytest.mark.parametrize(
    ("folder", "readable"),
    [
        ("001.Black_footed_Albatross", "Black footed Albatross"),
        ("n02085620-Chihuahua", "Chihuahua"),
        ("n02085620_Chihuahua", "Chihuahua"),
        ("Black_footed_Albatross", "Black footed Albatross"),
        ("yorkshire_terrier", "yorkshire terrier"),
        ("2012_Tesla_Model_S", "2012 Tesla Model S"),  # a year is part of the name, not an id
        ("black-footed  albatross_", "black-footed albatross"),
        ("1", "1"),
        ("001.", "001."),  # nothing left: kept as it is
    ],
)
def test_the_rule(folder, readable):
    assert readable_class_name(folder) == readable


def test_two_folders_that_read_the_same_are_refused_naming_both():
    with pytest.raises(
        ValueError, match=r"'001.Cat' and '002.cat' both read 'cat'.*--data.readable_names false"
    ):
        readable_class_names(["001.Cat", "002.cat"], "dataset 'x'")


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("birds")
    photos = sample_photos()
    for cls, names in FOLDERS.items():
        (root / "test" / cls).mkdir(parents=True)
        for name in names:
            img = photos[name].convert("RGB")
            img.thumbnail((48, 48))
            img.save(root / "test" / cls / f"{name}.jpg", quality=90)
    return root


def test_folder_names_are_readable_in_prompts_and_kept_in_the_dataset(folder):
    dm = CascadeDataModule(str(folder))
    assert dm.class_names == READABLE and dm.prompt_names_changed
    assert dm.source_class_names == list(FOLDERS) == dm.dsd["test"].features["label"].names
    plain = CascadeDataModule(str(folder), readable_names=False)
    assert plain.class_names == list(FOLDERS) and not plain.prompt_names_changed
    # names given by the user are theirs, as given
    assert CascadeDataModule(str(folder), class_names=["a_b", "c", "d"]).class_names == ["a_b", "c", "d"]


def test_prompts_and_run_names_follow_the_readable_names(
    tiny_clip_path, tiny_clip_bundle, folder, tmp_path, clean_fake_lvlm
):
    def run(out, *extra):
        main(["--model.model_name", "cascadevlm-tiny-vit", "--model.pretrained", str(tiny_clip_path),
              "--data.dataset", str(folder), "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false",
              "--lvlm.class_path", FAKE, "--cascade.tau", "-inf", "--cascade.topk", "2",
              "--output_dir", str(out), "--cache_dir", str(tmp_path / "cache"), *extra])  # fmt: skip
        (run_dir,) = out.iterdir()
        return run_dir, read_records(run_dir / "records.parquet")

    readable_dir, readable = run(tmp_path / "readable")
    candidates = {c for r in clean_fake_lvlm.log for c in r.candidates}
    assert candidates <= set(READABLE) and len(candidates) > 1  # the LVLM is shown readable names
    clean_fake_lvlm.log.clear()
    plain_dir, plain = run(tmp_path / "plain", "--data.readable_names", "false", "--lvlm", "null")
    # the readable names change the prompts: their hash is in the run name (folder names: as before)
    assert "_cls" in readable_dir.name and "_cls" not in plain_dir.name

    # CLIP's head is built from the readable names: probabilities equal a reference head's
    b = tiny_clip_bundle
    dm = CascadeDataModule(str(folder))
    for names, records in ((READABLE, readable), (list(FOLDERS), plain)):
        head = build_zero_shot_head(b.model, b.tokenizer, names, dm.templates)
        for r in records:
            img = dm.eval_dataset()[r.index]["image"]
            from cascadevlm.data.loading import decode_image

            x = b.preprocess(decode_image(img, "ref")).unsqueeze(0)
            p = (100.0 * b.model.encode_image(x, normalize=True) @ head.T).softmax(-1)[0]
            assert r.clip_topk_probs == pytest.approx(p.topk(len(r.clip_topk)).values.tolist(), abs=1e-4)
    assert [r.label for r in readable] == [r.label for r in plain] == dm.labels()  # records: the same ids

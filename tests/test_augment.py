"""The paper's augmentation ablation and batch-size comparison: each augmentation does what its docs say, every
set of the paper builds (or is refused with its reason on digits), the trainer and CLI take them, and both
ablation commands run."""
import csv

import pytest
import torch

from metaug_fast.cli import compare
from metaug_fast.cli import train as cli
from metaug_fast.metaug import augment as A
from metaug_fast.metaug.trainer import TrainConfig


def _image(seed=0, c=3, size=32):
    return torch.rand(c, size, size, generator=torch.Generator().manual_seed(seed))


def _draws(transform, x, n=40):
    torch.manual_seed(0)
    return [transform(x) for _ in range(n)]


def test_flip_mirrors_half_of_the_draws():
    x = _image()
    outs = _draws(A.per_image(("flip",), 32, digits=False), x)
    flipped = sum(torch.equal(o, x.flip(-1)) for o in outs)
    kept = sum(torch.equal(o, x) for o in outs)
    assert flipped + kept == len(outs) and 10 <= flipped <= 30


def test_rotate_turns_within_its_range():
    # A bright ray from the centre turns about it by at most 30° (digits 15°), the draws by various angles.
    def angle(img, centre):
        ys, xs = torch.meshgrid(torch.arange(img.shape[-2]), torch.arange(img.shape[-1]), indexing="ij")
        w = img[0].clamp(min=0)
        return torch.rad2deg(torch.atan2((w * ys).sum() / w.sum() - centre, (w * xs).sum() / w.sum() - centre))

    for digits, size, limit in ((False, 33, 30), (True, 8, 15)):
        x = torch.zeros(1 if digits else 3, size, size)
        x[:, size // 2, size // 2 + 1:] = 1.0
        centre = (size - 1) / 2
        t = A.per_image(("rotate",), size, digits=digits)
        torch.manual_seed(1)
        turns = [(angle(t(x), centre) - angle(x, centre)).abs().item() for _ in range(30)]
        assert max(turns) <= limit + 3 and max(turns) > limit / 2 and len({round(a, 3) for a in turns}) > 5


def test_crop_resizes_a_part_of_the_image_and_digits_shift_by_a_pixel():
    x = _image(size=48)
    outs = _draws(A.per_image(("crop",), 32, digits=False), x, 10)
    assert all(o.shape == (3, 32, 32) for o in outs) and len({o.sum().item() for o in outs}) > 5
    d = _image(c=1, size=8)
    padded = torch.nn.functional.pad(d, (1, 1, 1, 1))
    shifts = {(dy, dx) for dy in range(3) for dx in range(3)}
    for o in _draws(A.per_image(("crop",), 8, digits=True), d, 20):
        assert any(torch.equal(o, padded[:, dy:dy + 8, dx:dx + 8]) for dy, dx in shifts)
    # Without crop an image is only resized to the training size.
    assert A.per_image(("flip",), 16, digits=False)(_image(size=48)).shape == (3, 16, 16)


def test_grey_removes_the_colour_of_a_fifth_of_the_draws_and_is_refused_for_digits():
    x = _image()
    outs = _draws(A.per_image(("grey",), 32, digits=False), x, 100)
    grey = [o for o in outs if torch.allclose(o[0], o[1]) and torch.allclose(o[1], o[2])]
    assert 8 <= len(grey) <= 35 and all(torch.equal(o, x) for o in outs if not torch.allclose(o[0], o[1]))
    with pytest.raises(ValueError, match="digits cannot take grey"):
        A.per_image(("grey",), 8, digits=True)


def test_jitter_changes_colour_and_digits_get_brightness_contrast_and_noise():
    x = _image()
    outs = _draws(A.per_image(("jitter",), 32, digits=False), x, 30)
    changed = [o for o in outs if not torch.equal(o, x)]
    assert 15 <= len(changed) <= 30 and all(o.shape == x.shape for o in outs)
    d = _image(c=1, size=8)
    o = A.per_image(("jitter",), 8, digits=True)(d)
    assert o.shape == d.shape and not torch.equal(o, d)


def test_mixup_mixes_each_sample_with_another_keeping_the_larger_share():
    views = (torch.randn(6, 1, 8, 8), torch.randn(6, 1, 8, 8))
    gen = torch.Generator().manual_seed(3)
    mixed = A.mixup(views, gen)
    gen = torch.Generator().manual_seed(3)
    for x, y in zip(views, mixed):
        perm = torch.randperm(6, generator=gen)
        u = torch.rand(6, generator=gen, dtype=torch.float64)
        lam = torch.maximum(u, 1 - u).float().view(6, 1, 1, 1)
        assert (lam >= 0.5).all()
        torch.testing.assert_close(y, lam * x + (1 - lam) * x[perm])


def test_every_paper_set_builds():
    assert A.PAPER_SETS[8] == A.AUGMENTATIONS and len(A.PAPER_SETS) == 8
    for i, names in A.PAPER_SETS.items():
        assert A.paper_set(i) == names
        out = A.per_image(names, 24, digits=False)(_image(size=40))
        assert out.shape == (3, 24, 24), i
        if "grey" in names:
            with pytest.raises(ValueError, match="grey"):
                A.per_image(names, 8, digits=True)
        else:
            assert A.per_image(names, 8, digits=True)(_image(c=1, size=8)).shape == (1, 8, 8)
    with pytest.raises(ValueError, match="augment_id must be one of 1..8"):
        A.paper_set(9)


def test_parse_augment_names_and_errors():
    assert A.parse_augment("crop, flip") == ("flip", "crop")
    with pytest.raises(ValueError, match=r"augment: unknown augmentation\(s\) \['spin'\]"):
        A.parse_augment("flip,spin")
    with pytest.raises(ValueError, match="twice"):
        A.parse_augment("flip,flip")


def test_the_trainer_and_cli_take_a_set(tmp_path):
    args = cli.build_parser().parse_args(["--augment-id", "7", "--out", str(tmp_path)])
    assert cli.config_from_args(args).augment == ("flip", "crop", "mixup")
    args = cli.build_parser().parse_args(["--augment", "rotate,crop", "--out", str(tmp_path)])
    assert cli.config_from_args(args).augment == ("rotate", "crop")
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["--augment", "flip", "--augment-id", "2"])
    with pytest.raises(ValueError, match="digits cannot take grey"):
        TrainConfig(dataset="digits", augment="grey,flip")
    assert TrainConfig(dataset="digits", augment=["crop", "flip"]).augment == ("flip", "crop")


def test_both_ablations_run_print_their_tables_and_write_their_files(tmp_path, capsys):
    common = ["--epochs", "1", "--max-steps", "1", "--probe-epochs", "1", "--k-neg", "8", "--mag-hidden", "8",
              "--jobs", "1", "--quiet", "--out", str(tmp_path)]
    assert compare.main(["--ablation", "augment", "--seeds", "0", *common]) == 0
    out = capsys.readouterr().out
    assert "| 3: grey | n/a: digits cannot take grey" in out and "| 7: flip + crop + mixup |" in out
    rows = list(csv.DictReader(open(tmp_path / "ablation_augment.csv")))
    assert len(rows) == 6 * 2  # the six sets digits take × two methods, one seed
    diffs = list(csv.DictReader(open(tmp_path / "ablation_augment_differences.csv")))
    assert {d["setting"] for d in diffs} == {f"{i}: {' + '.join(A.PAPER_SETS[i])}" for i in (1, 2, 4, 5, 6, 7)}
    assert (tmp_path / "ablation_augment.png").stat().st_size > 0
    assert compare.main(["--ablation", "batch-size", "--batch-sizes", "8", "16", "--seeds", "0", "1", *common]) == 0
    out = capsys.readouterr().out
    assert "| batch 8 |" in out and "| batch 16 |" in out and "MetAug − only-OUCL" in out
    assert len(list(csv.DictReader(open(tmp_path / "ablation_batch-size.csv")))) == 2 * 2 * 2
    # The tables again from the CSV, without training.
    assert compare.main(["--ablation", "batch-size", "--batch-sizes", "8", "16", "--summarize",
                         str(tmp_path / "ablation_batch-size.csv"), "--out", str(tmp_path / "again")]) == 0
    assert "| batch 8 |" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        compare.main(["--ablation", "batch-size", "--chunk-size", "4"])  # gradient caching needs features

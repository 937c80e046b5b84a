"""The embedded default dataset, generated in-process so Lumos runs offline.

A catalog of items with readable titles and categories, and users whose sequences mix two
signals a sequential recommender can learn and a popularity ranking cannot:

* **latent category preferences** — each user favours a few categories (Dirichlet draw);
* **item-to-item transitions** — every item has a few "follow-up" items (a sequel, an
  accessory), and a user often picks one of the last item's follow-ups next.

Everything is drawn from one ``numpy`` generator, so a seed fixes the dataset exactly.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lumosrec.core.dataset import Dataset

CATALOG: dict[str, tuple[str, ...]] = {
    "Books|Science Fiction": ("Starship Chronicle", "Galactic Atlas", "Android Diaries", "Orbit Saga", "Time Engine"),
    "Books|Mystery": ("Harbor Murders", "Silent Witness", "Locked Room Casebook", "Detective Notebook", "Cold Trail"),
    "Kitchen|Cookware": ("Cast Iron Skillet", "Chef Knife", "Dutch Oven", "Saucepan Set", "Wok"),
    "Kitchen|Coffee": ("Espresso Machine", "Burr Grinder", "Pour-Over Kettle", "French Press", "Milk Frother"),
    "Sports|Running": ("Trail Running Shoes", "Hydration Vest", "Running Socks", "GPS Watch", "Compression Tights"),
    "Sports|Yoga": ("Yoga Mat", "Cork Yoga Block", "Stretch Strap", "Meditation Cushion", "Yoga Towel"),
    "Beauty|Skin Care": ("Hydrating Serum", "Night Cream", "Gentle Cleanser", "Sunscreen SPF 50", "Clay Mask"),
    "Beauty|Makeup": ("Matte Lipstick", "Volume Mascara", "Eyeshadow Palette", "Liquid Foundation", "Blush Duo"),
    "Electronics|Audio": ("Wireless Earbuds", "Bluetooth Speaker", "Studio Headphones", "Soundbar", "Turntable"),
    "Electronics|Photo": ("Mirrorless Camera", "Prime Lens", "Camera Tripod", "Memory Card", "Camera Bag"),
    "Garden|Plants": ("Tomato Seeds", "Herb Planter", "Potting Soil", "Watering Can", "Pruning Shears"),
    "Toys|Puzzles": ("Jigsaw Puzzle", "Logic Cube", "Wooden Maze", "3D Puzzle Castle", "Brain Teaser Set"),
}
EDITIONS = ("Classic", "Pro", "Deluxe", "Mini", "Eco", "Travel", "Premium", "Essential")
BRANDS = ("Acme", "Northwind", "Bluefin", "Oakridge", "Lumen", "Verde", "Solace", "Kestrel")


@dataclass
class SyntheticConfig:
    """Size and strength of the generated signals."""

    num_users: int = 1200
    items_per_category: int = 40
    mean_length: float = 18.0
    min_length: int = 5
    max_length: int = 80
    follow_up_probability: float = 0.6
    follow_ups_per_item: int = 3
    preference_concentration: float = 0.3
    seed: int = 42


def generate(config: SyntheticConfig | None = None) -> Dataset:
    """Generate the synthetic dataset (deterministic for a given ``config.seed``)."""
    config = config or SyntheticConfig()
    rng = np.random.default_rng(config.seed)
    titles, categories, category_of = _catalog(config, rng)
    num_items = len(titles)
    num_categories = len(CATALOG)
    members = [np.flatnonzero(category_of == c) + 1 for c in range(num_categories)]
    # Zipf-like popularity inside each category, so that popularity is a real baseline.
    popularity = [1.0 / np.arange(1, len(m) + 1) ** 0.8 for m in members]
    popularity = [p / p.sum() for p in popularity]
    follow_ups = _follow_ups(config, members, category_of, rng)

    sequences = []
    for _ in range(config.num_users):
        preference = rng.dirichlet(np.full(num_categories, config.preference_concentration))
        length = int(np.clip(rng.geometric(1.0 / config.mean_length), config.min_length, config.max_length))
        sequence: list[int] = []
        while len(sequence) < length:
            if sequence and rng.random() < config.follow_up_probability:
                item = int(rng.choice(follow_ups[sequence[-1]]))
            else:
                category = rng.choice(num_categories, p=preference)
                item = int(rng.choice(members[category], p=popularity[category]))
            if item not in sequence[-10:]:
                sequence.append(item)
        sequences.append(np.array(sequence, dtype=np.int64))

    return Dataset(
        name="synthetic",
        sequences=sequences,
        user_ids=[str(u) for u in range(1, config.num_users + 1)],
        item_ids=[""] + [str(i) for i in range(1, num_items + 1)],
        titles=["", *titles],
        categories=[(), *categories],
    )


def _catalog(config: SyntheticConfig, rng: np.random.Generator) -> tuple[list[str], list[tuple[str, ...]], np.ndarray]:
    titles, categories, category_of = [], [], []
    for index, (category, products) in enumerate(CATALOG.items()):
        combos = [(b, e, p) for b in BRANDS for e in EDITIONS for p in products]
        for choice in rng.choice(len(combos), config.items_per_category, replace=False):
            brand, edition, product = combos[choice]
            titles.append(f"{brand} {product} {edition}")
            categories.append(tuple(category.split("|")))
            category_of.append(index)
    return titles, categories, np.array(category_of)


def _follow_ups(
    config: SyntheticConfig, members: list[np.ndarray], category_of: np.ndarray, rng: np.random.Generator
) -> dict[int, np.ndarray]:
    """Each item's follow-ups: mostly from its own category, one from a neighbouring one."""
    follow_ups = {}
    for item in range(1, len(category_of) + 1):
        category = category_of[item - 1]
        same = members[category][members[category] != item]
        picks = list(rng.choice(same, config.follow_ups_per_item - 1, replace=False))
        neighbour = members[(category + 1) % len(members)]
        picks.append(rng.choice(neighbour))
        follow_ups[item] = np.array(picks, dtype=np.int64)
    return follow_ups


def write_folder(dataset: Dataset, out_dir: str | Path) -> Path:
    """Write a dataset in the uniform folder format (``interactions.csv`` + ``items.csv``)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "interactions.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(["user_id", "item_id", "timestamp"])
        for user, sequence in zip(dataset.user_ids, dataset.sequences):
            writer.writerows([user, dataset.item_ids[item], order] for order, item in enumerate(sequence))
    with open(out_dir / "items.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(["item_id", "title", "categories"])
        for index in range(1, dataset.num_items + 1):
            writer.writerow([dataset.item_ids[index], dataset.titles[index], "|".join(dataset.categories[index])])
    return out_dir

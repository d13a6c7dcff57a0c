"""Registry entries of the fine-grained benchmarks: clean class names, CLIP prompt templates, raw layout.

Class names are listed in the order of each dataset's official label ids (so label ``i`` of the prepared
dataset is the official label ``i + 1``). Where the official files spell a class differently from the
clean name (folder names, underscores, CUB's numbered directories), ``extra["raw_names"]`` holds the
official spelling in the same order; :mod:`cascadevlm.data.prepare` maps official names to labels by it.

Templates follow the per-dataset prompts published with CLIP (``data/prompts.md`` of openai/CLIP).
"""

from __future__ import annotations

from cascadevlm.data.spec import BenchmarkSpec

# --- Stanford Cars: the names of devkit/cars_meta.mat, in its order (already clean) ----------------
CARS_CLASSES: tuple[str, ...] = (
    "AM General Hummer SUV 2000", "Acura RL Sedan 2012", "Acura TL Sedan 2012", "Acura TL Type-S 2008",
    "Acura TSX Sedan 2012", "Acura Integra Type R 2001", "Acura ZDX Hatchback 2012",
    "Aston Martin V8 Vantage Convertible 2012", "Aston Martin V8 Vantage Coupe 2012",
    "Aston Martin Virage Convertible 2012", "Aston Martin Virage Coupe 2012", "Audi RS 4 Convertible 2008",
    "Audi A5 Coupe 2012", "Audi TTS Coupe 2012", "Audi R8 Coupe 2012", "Audi V8 Sedan 1994",
    "Audi 100 Sedan 1994", "Audi 100 Wagon 1994", "Audi TT Hatchback 2011", "Audi S6 Sedan 2011",
    "Audi S5 Convertible 2012", "Audi S5 Coupe 2012", "Audi S4 Sedan 2012", "Audi S4 Sedan 2007",
    "Audi TT RS Coupe 2012", "BMW ActiveHybrid 5 Sedan 2012", "BMW 1 Series Convertible 2012",
    "BMW 1 Series Coupe 2012", "BMW 3 Series Sedan 2012", "BMW 3 Series Wagon 2012",
    "BMW 6 Series Convertible 2007", "BMW X5 SUV 2007", "BMW X6 SUV 2012", "BMW M3 Coupe 2012",
    "BMW M5 Sedan 2010", "BMW M6 Convertible 2010", "BMW X3 SUV 2012", "BMW Z4 Convertible 2012",
    "Bentley Continental Supersports Conv. Convertible 2012", "Bentley Arnage Sedan 2009",
    "Bentley Mulsanne Sedan 2011", "Bentley Continental GT Coupe 2012", "Bentley Continental GT Coupe 2007",
    "Bentley Continental Flying Spur Sedan 2007", "Bugatti Veyron 16.4 Convertible 2009",
    "Bugatti Veyron 16.4 Coupe 2009", "Buick Regal GS 2012", "Buick Rainier SUV 2007",
    "Buick Verano Sedan 2012", "Buick Enclave SUV 2012", "Cadillac CTS-V Sedan 2012", "Cadillac SRX SUV 2012",
    "Cadillac Escalade EXT Crew Cab 2007", "Chevrolet Silverado 1500 Hybrid Crew Cab 2012",
    "Chevrolet Corvette Convertible 2012", "Chevrolet Corvette ZR1 2012",
    "Chevrolet Corvette Ron Fellows Edition Z06 2007", "Chevrolet Traverse SUV 2012",
    "Chevrolet Camaro Convertible 2012", "Chevrolet HHR SS 2010", "Chevrolet Impala Sedan 2007",
    "Chevrolet Tahoe Hybrid SUV 2012", "Chevrolet Sonic Sedan 2012", "Chevrolet Express Cargo Van 2007",
    "Chevrolet Avalanche Crew Cab 2012", "Chevrolet Cobalt SS 2010", "Chevrolet Malibu Hybrid Sedan 2010",
    "Chevrolet TrailBlazer SS 2009", "Chevrolet Silverado 2500HD Regular Cab 2012",
    "Chevrolet Silverado 1500 Classic Extended Cab 2007", "Chevrolet Express Van 2007",
    "Chevrolet Monte Carlo Coupe 2007", "Chevrolet Malibu Sedan 2007",
    "Chevrolet Silverado 1500 Extended Cab 2012", "Chevrolet Silverado 1500 Regular Cab 2012",
    "Chrysler Aspen SUV 2009", "Chrysler Sebring Convertible 2010", "Chrysler Town and Country Minivan 2012",
    "Chrysler 300 SRT-8 2010", "Chrysler Crossfire Convertible 2008", "Chrysler PT Cruiser Convertible 2008",
    "Daewoo Nubira Wagon 2002", "Dodge Caliber Wagon 2012", "Dodge Caliber Wagon 2007",
    "Dodge Caravan Minivan 1997", "Dodge Ram Pickup 3500 Crew Cab 2010", "Dodge Ram Pickup 3500 Quad Cab 2009",
    "Dodge Sprinter Cargo Van 2009", "Dodge Journey SUV 2012", "Dodge Dakota Crew Cab 2010",
    "Dodge Dakota Club Cab 2007", "Dodge Magnum Wagon 2008", "Dodge Challenger SRT8 2011",
    "Dodge Durango SUV 2012", "Dodge Durango SUV 2007", "Dodge Charger Sedan 2012", "Dodge Charger SRT-8 2009",
    "Eagle Talon Hatchback 1998", "FIAT 500 Abarth 2012", "FIAT 500 Convertible 2012", "Ferrari FF Coupe 2012",
    "Ferrari California Convertible 2012", "Ferrari 458 Italia Convertible 2012",
    "Ferrari 458 Italia Coupe 2012", "Fisker Karma Sedan 2012", "Ford F-450 Super Duty Crew Cab 2012",
    "Ford Mustang Convertible 2007", "Ford Freestar Minivan 2007", "Ford Expedition EL SUV 2009",
    "Ford Edge SUV 2012", "Ford Ranger SuperCab 2011", "Ford GT Coupe 2006", "Ford F-150 Regular Cab 2012",
    "Ford F-150 Regular Cab 2007", "Ford Focus Sedan 2007", "Ford E-Series Wagon Van 2012",
    "Ford Fiesta Sedan 2012", "GMC Terrain SUV 2012", "GMC Savana Van 2012", "GMC Yukon Hybrid SUV 2012",
    "GMC Acadia SUV 2012", "GMC Canyon Extended Cab 2012", "Geo Metro Convertible 1993",
    "HUMMER H3T Crew Cab 2010", "HUMMER H2 SUT Crew Cab 2009", "Honda Odyssey Minivan 2012",
    "Honda Odyssey Minivan 2007", "Honda Accord Coupe 2012", "Honda Accord Sedan 2012",
    "Hyundai Veloster Hatchback 2012", "Hyundai Santa Fe SUV 2012", "Hyundai Tucson SUV 2012",
    "Hyundai Veracruz SUV 2012", "Hyundai Sonata Hybrid Sedan 2012", "Hyundai Elantra Sedan 2007",
    "Hyundai Accent Sedan 2012", "Hyundai Genesis Sedan 2012", "Hyundai Sonata Sedan 2012",
    "Hyundai Elantra Touring Hatchback 2012", "Hyundai Azera Sedan 2012", "Infiniti G Coupe IPL 2012",
    "Infiniti QX56 SUV 2011", "Isuzu Ascender SUV 2008", "Jaguar XK XKR 2012", "Jeep Patriot SUV 2012",
    "Jeep Wrangler SUV 2012", "Jeep Liberty SUV 2012", "Jeep Grand Cherokee SUV 2012", "Jeep Compass SUV 2012",
    "Lamborghini Reventon Coupe 2008", "Lamborghini Aventador Coupe 2012",
    "Lamborghini Gallardo LP 570-4 Superleggera 2012", "Lamborghini Diablo Coupe 2001",
    "Land Rover Range Rover SUV 2012", "Land Rover LR2 SUV 2012", "Lincoln Town Car Sedan 2011",
    "MINI Cooper Roadster Convertible 2012", "Maybach Landaulet Convertible 2012", "Mazda Tribute SUV 2011",
    "McLaren MP4-12C Coupe 2012", "Mercedes-Benz 300-Class Convertible 1993",
    "Mercedes-Benz C-Class Sedan 2012", "Mercedes-Benz SL-Class Coupe 2009",
    "Mercedes-Benz E-Class Sedan 2012", "Mercedes-Benz S-Class Sedan 2012", "Mercedes-Benz Sprinter Van 2012",
    "Mitsubishi Lancer Sedan 2012", "Nissan Leaf Hatchback 2012", "Nissan NV Passenger Van 2012",
    "Nissan Juke Hatchback 2012", "Nissan 240SX Coupe 1998", "Plymouth Neon Coupe 1999",
    "Porsche Panamera Sedan 2012", "Ram C/V Cargo Van Minivan 2012",
    "Rolls-Royce Phantom Drophead Coupe Convertible 2012", "Rolls-Royce Ghost Sedan 2012",
    "Rolls-Royce Phantom Sedan 2012", "Scion xD Hatchback 2012", "Spyker C8 Convertible 2009",
    "Spyker C8 Coupe 2009", "Suzuki Aerio Sedan 2007", "Suzuki Kizashi Sedan 2012", "Suzuki SX4 Hatchback 2012",
    "Suzuki SX4 Sedan 2012", "Tesla Model S Sedan 2012", "Toyota Sequoia SUV 2012", "Toyota Camry Sedan 2012",
    "Toyota Corolla Sedan 2012", "Toyota 4Runner SUV 2012", "Volkswagen Golf Hatchback 2012",
    "Volkswagen Golf Hatchback 1991", "Volkswagen Beetle Hatchback 2012", "Volvo C30 Hatchback 2012",
    "Volvo 240 Sedan 1993", "Volvo XC90 SUV 2007", "smart fortwo Convertible 2012",
)  # fmt: skip

# --- FGVC Aircraft: data/variants.txt, in its order ------------------------------------------------
AIRCRAFT_VARIANTS: tuple[str, ...] = (
    "707-320", "727-200", "737-200", "737-300", "737-400", "737-500", "737-600", "737-700", "737-800",
    "737-900", "747-100", "747-200", "747-300", "747-400", "757-200", "757-300", "767-200", "767-300",
    "767-400", "777-200", "777-300", "A300B4", "A310", "A318", "A319", "A320", "A321", "A330-200",
    "A330-300", "A340-200", "A340-300", "A340-500", "A340-600", "A380", "ATR-42", "ATR-72", "An-12",
    "BAE 146-200", "BAE 146-300", "BAE-125", "Beechcraft 1900", "Boeing 717", "C-130", "C-47", "CRJ-200",
    "CRJ-700", "CRJ-900", "Cessna 172", "Cessna 208", "Cessna 525", "Cessna 560", "Challenger 600", "DC-10",
    "DC-3", "DC-6", "DC-8", "DC-9-30", "DH-82", "DHC-1", "DHC-6", "DHC-8-100", "DHC-8-300", "DR-400",
    "Dornier 328", "E-170", "E-190", "E-195", "EMB-120", "ERJ 135", "ERJ 145", "Embraer Legacy 600",
    "Eurofighter Typhoon", "F-16A/B", "F/A-18", "Falcon 2000", "Falcon 900", "Fokker 100", "Fokker 50",
    "Fokker 70", "Global Express", "Gulfstream IV", "Gulfstream V", "Hawk T1", "Il-76", "L-1011", "MD-11",
    "MD-80", "MD-87", "MD-90", "Metroliner", "Model B200", "PA-28", "SR-20", "Saab 2000", "Saab 340",
    "Spitfire", "Tornado", "Tu-134", "Tu-154", "Yak-42",
)  # fmt: skip

# --- Oxford Flowers 102: names for imagelabels.mat labels 1..102 (the .mat files carry no names) ---
FLOWERS_CLASSES: tuple[str, ...] = (
    "pink primrose", "hard-leaved pocket orchid", "canterbury bells", "sweet pea", "english marigold",
    "tiger lily", "moon orchid", "bird of paradise", "monkshood", "globe thistle", "snapdragon",
    "colt's foot", "king protea", "spear thistle", "yellow iris", "globe-flower", "purple coneflower",
    "peruvian lily", "balloon flower", "giant white arum lily", "fire lily", "pincushion flower",
    "fritillary", "red ginger", "grape hyacinth", "corn poppy", "prince of wales feathers",
    "stemless gentian", "artichoke", "sweet william", "carnation", "garden phlox", "love in the mist",
    "mexican aster", "alpine sea holly", "ruby-lipped cattleya", "cape flower", "great masterwort",
    "siam tulip", "lenten rose", "barbeton daisy", "daffodil", "sword lily", "poinsettia",
    "bolero deep blue", "wallflower", "marigold", "buttercup", "oxeye daisy", "common dandelion", "petunia",
    "wild pansy", "primula", "sunflower", "pelargonium", "bishop of llandaff", "gaura", "geranium",
    "orange dahlia", "pink-yellow dahlia", "cautleya spicata", "japanese anemone", "black-eyed susan",
    "silverbush", "californian poppy", "osteospermum", "spring crocus", "bearded iris", "windflower",
    "tree poppy", "gazania", "azalea", "water lily", "rose", "thorn apple", "morning glory",
    "passion flower", "lotus", "toad lily", "anthurium", "frangipani", "clematis", "hibiscus", "columbine",
    "desert-rose", "tree mallow", "magnolia", "cyclamen", "watercress", "canna lily", "hippeastrum",
    "bee balm", "ball moss", "foxglove", "bougainvillea", "camellia", "mallow", "mexican petunia",
    "bromelia", "blanket flower", "trumpet creeper", "blackberry lily",
)  # fmt: skip

# --- CUB-200-2011: classes.txt, in its order ------------------------------------------------------
CUB_RAW_NAMES: tuple[str, ...] = (
    "001.Black_footed_Albatross", "002.Laysan_Albatross", "003.Sooty_Albatross", "004.Groove_billed_Ani",
    "005.Crested_Auklet", "006.Least_Auklet", "007.Parakeet_Auklet", "008.Rhinoceros_Auklet",
    "009.Brewer_Blackbird", "010.Red_winged_Blackbird", "011.Rusty_Blackbird", "012.Yellow_headed_Blackbird",
    "013.Bobolink", "014.Indigo_Bunting", "015.Lazuli_Bunting", "016.Painted_Bunting", "017.Cardinal",
    "018.Spotted_Catbird", "019.Gray_Catbird", "020.Yellow_breasted_Chat", "021.Eastern_Towhee",
    "022.Chuck_will_Widow", "023.Brandt_Cormorant", "024.Red_faced_Cormorant", "025.Pelagic_Cormorant",
    "026.Bronzed_Cowbird", "027.Shiny_Cowbird", "028.Brown_Creeper", "029.American_Crow", "030.Fish_Crow",
    "031.Black_billed_Cuckoo", "032.Mangrove_Cuckoo", "033.Yellow_billed_Cuckoo",
    "034.Gray_crowned_Rosy_Finch", "035.Purple_Finch", "036.Northern_Flicker", "037.Acadian_Flycatcher",
    "038.Great_Crested_Flycatcher", "039.Least_Flycatcher", "040.Olive_sided_Flycatcher",
    "041.Scissor_tailed_Flycatcher", "042.Vermilion_Flycatcher", "043.Yellow_bellied_Flycatcher",
    "044.Frigatebird", "045.Northern_Fulmar", "046.Gadwall", "047.American_Goldfinch",
    "048.European_Goldfinch", "049.Boat_tailed_Grackle", "050.Eared_Grebe", "051.Horned_Grebe",
    "052.Pied_billed_Grebe", "053.Western_Grebe", "054.Blue_Grosbeak", "055.Evening_Grosbeak",
    "056.Pine_Grosbeak", "057.Rose_breasted_Grosbeak", "058.Pigeon_Guillemot", "059.California_Gull",
    "060.Glaucous_winged_Gull", "061.Heermann_Gull", "062.Herring_Gull", "063.Ivory_Gull",
    "064.Ring_billed_Gull", "065.Slaty_backed_Gull", "066.Western_Gull", "067.Anna_Hummingbird",
    "068.Ruby_throated_Hummingbird", "069.Rufous_Hummingbird", "070.Green_Violetear",
    "071.Long_tailed_Jaeger", "072.Pomarine_Jaeger", "073.Blue_Jay", "074.Florida_Jay", "075.Green_Jay",
    "076.Dark_eyed_Junco", "077.Tropical_Kingbird", "078.Gray_Kingbird", "079.Belted_Kingfisher",
    "080.Green_Kingfisher", "081.Pied_Kingfisher", "082.Ringed_Kingfisher", "083.White_breasted_Kingfisher",
    "084.Red_legged_Kittiwake", "085.Horned_Lark", "086.Pacific_Loon", "087.Mallard",
    "088.Western_Meadowlark", "089.Hooded_Merganser", "090.Red_breasted_Merganser", "091.Mockingbird",
    "092.Nighthawk", "093.Clark_Nutcracker", "094.White_breasted_Nuthatch", "095.Baltimore_Oriole",
    "096.Hooded_Oriole", "097.Orchard_Oriole", "098.Scott_Oriole", "099.Ovenbird", "100.Brown_Pelican",
    "101.White_Pelican", "102.Western_Wood_Pewee", "103.Sayornis", "104.American_Pipit",
    "105.Whip_poor_Will", "106.Horned_Puffin", "107.Common_Raven", "108.White_necked_Raven",
    "109.American_Redstart", "110.Geococcyx", "111.Loggerhead_Shrike", "112.Great_Grey_Shrike",
    "113.Baird_Sparrow", "114.Black_throated_Sparrow", "115.Brewer_Sparrow", "116.Chipping_Sparrow",
    "117.Clay_colored_Sparrow", "118.House_Sparrow", "119.Field_Sparrow", "120.Fox_Sparrow",
    "121.Grasshopper_Sparrow", "122.Harris_Sparrow", "123.Henslow_Sparrow", "124.Le_Conte_Sparrow",
    "125.Lincoln_Sparrow", "126.Nelson_Sharp_tailed_Sparrow", "127.Savannah_Sparrow", "128.Seaside_Sparrow",
    "129.Song_Sparrow", "130.Tree_Sparrow", "131.Vesper_Sparrow", "132.White_crowned_Sparrow",
    "133.White_throated_Sparrow", "134.Cape_Glossy_Starling", "135.Bank_Swallow", "136.Barn_Swallow",
    "137.Cliff_Swallow", "138.Tree_Swallow", "139.Scarlet_Tanager", "140.Summer_Tanager", "141.Artic_Tern",
    "142.Black_Tern", "143.Caspian_Tern", "144.Common_Tern", "145.Elegant_Tern", "146.Forsters_Tern",
    "147.Least_Tern", "148.Green_tailed_Towhee", "149.Brown_Thrasher", "150.Sage_Thrasher",
    "151.Black_capped_Vireo", "152.Blue_headed_Vireo", "153.Philadelphia_Vireo", "154.Red_eyed_Vireo",
    "155.Warbling_Vireo", "156.White_eyed_Vireo", "157.Yellow_throated_Vireo", "158.Bay_breasted_Warbler",
    "159.Black_and_white_Warbler", "160.Black_throated_Blue_Warbler", "161.Blue_winged_Warbler",
    "162.Canada_Warbler", "163.Cape_May_Warbler", "164.Cerulean_Warbler", "165.Chestnut_sided_Warbler",
    "166.Golden_winged_Warbler", "167.Hooded_Warbler", "168.Kentucky_Warbler", "169.Magnolia_Warbler",
    "170.Mourning_Warbler", "171.Myrtle_Warbler", "172.Nashville_Warbler", "173.Orange_crowned_Warbler",
    "174.Palm_Warbler", "175.Pine_Warbler", "176.Prairie_Warbler", "177.Prothonotary_Warbler",
    "178.Swainson_Warbler", "179.Tennessee_Warbler", "180.Wilson_Warbler", "181.Worm_eating_Warbler",
    "182.Yellow_Warbler", "183.Northern_Waterthrush", "184.Louisiana_Waterthrush", "185.Bohemian_Waxwing",
    "186.Cedar_Waxwing", "187.American_Three_toed_Woodpecker", "188.Pileated_Woodpecker",
    "189.Red_bellied_Woodpecker", "190.Red_cockaded_Woodpecker", "191.Red_headed_Woodpecker",
    "192.Downy_Woodpecker", "193.Bewick_Wren", "194.Cactus_Wren", "195.Carolina_Wren", "196.House_Wren",
    "197.Marsh_Wren", "198.Rock_Wren", "199.Winter_Wren", "200.Common_Yellowthroat",
)  # fmt: skip

# Names the mechanical cleaning below cannot restore: the official typo, and the dropped apostrophes.
_CUB_FIXES = {
    "Artic Tern": "Arctic Tern",
    "Forsters Tern": "Forster's Tern",
    "Chuck-will Widow": "Chuck-will's-widow",
    "Whip-poor Will": "Whip-poor-will",
}
# Birds named after a person: the official names drop the possessive ("Brewer_Blackbird").
_CUB_EPONYMS = (
    "Anna", "Baird", "Bewick", "Brandt", "Brewer", "Clark", "Harris", "Heermann", "Henslow", "Le Conte",
    "Lincoln", "Nelson", "Scott", "Swainson", "Wilson",
)  # fmt: skip


def clean_cub_name(raw: str) -> str:
    """'004.Groove_billed_Ani' -> 'Groove-billed Ani'; 'Brewer_Blackbird' -> "Brewer's Blackbird"."""
    words = raw.split(".", 1)[-1].split("_")
    out = words[0]
    for w in words[1:]:
        # A lower-case word continues a compound adjective: Black_footed -> Black-footed.
        out += ("-" if w[:1].islower() else " ") + w
    out = _CUB_FIXES.get(out, out)
    for person in _CUB_EPONYMS:
        if out.startswith(person + " "):
            out = person + "'s" + out[len(person) :]
    return out


CUB_CLASSES: tuple[str, ...] = tuple(clean_cub_name(n) for n in CUB_RAW_NAMES)

# --- Oxford-IIIT Pets: breed prefixes of the image names, in class-id order 1..37 ------------------
PETS_RAW_NAMES: tuple[str, ...] = (
    "Abyssinian", "american_bulldog", "american_pit_bull_terrier", "basset_hound", "beagle", "Bengal",
    "Birman", "Bombay", "boxer", "British_Shorthair", "chihuahua", "Egyptian_Mau", "english_cocker_spaniel",
    "english_setter", "german_shorthaired", "great_pyrenees", "havanese", "japanese_chin", "keeshond",
    "leonberger", "Maine_Coon", "miniature_pinscher", "newfoundland", "Persian", "pomeranian", "pug",
    "Ragdoll", "Russian_Blue", "saint_bernard", "samoyed", "scottish_terrier", "shiba_inu", "Siamese",
    "Sphynx", "staffordshire_bull_terrier", "wheaten_terrier", "yorkshire_terrier",
)  # fmt: skip
PETS_CLASSES: tuple[str, ...] = tuple(
    " ".join(w[:1].upper() + w[1:] for w in n.split("_")) for n in PETS_RAW_NAMES
)

# --- Food-101: meta/classes.txt, in its order -------------------------------------------------------
FOOD_RAW_NAMES: tuple[str, ...] = (
    "apple_pie", "baby_back_ribs", "baklava", "beef_carpaccio", "beef_tartare", "beet_salad", "beignets",
    "bibimbap", "bread_pudding", "breakfast_burrito", "bruschetta", "caesar_salad", "cannoli",
    "caprese_salad", "carrot_cake", "ceviche", "cheesecake", "cheese_plate", "chicken_curry",
    "chicken_quesadilla", "chicken_wings", "chocolate_cake", "chocolate_mousse", "churros", "clam_chowder",
    "club_sandwich", "crab_cakes", "creme_brulee", "croque_madame", "cup_cakes", "deviled_eggs", "donuts",
    "dumplings", "edamame", "eggs_benedict", "escargots", "falafel", "filet_mignon", "fish_and_chips",
    "foie_gras", "french_fries", "french_onion_soup", "french_toast", "fried_calamari", "fried_rice",
    "frozen_yogurt", "garlic_bread", "gnocchi", "greek_salad", "grilled_cheese_sandwich", "grilled_salmon",
    "guacamole", "gyoza", "hamburger", "hot_and_sour_soup", "hot_dog", "huevos_rancheros", "hummus",
    "ice_cream", "lasagna", "lobster_bisque", "lobster_roll_sandwich", "macaroni_and_cheese", "macarons",
    "miso_soup", "mussels", "nachos", "omelette", "onion_rings", "oysters", "pad_thai", "paella", "pancakes",
    "panna_cotta", "peking_duck", "pho", "pizza", "pork_chop", "poutine", "prime_rib",
    "pulled_pork_sandwich", "ramen", "ravioli", "red_velvet_cake", "risotto", "samosa", "sashimi",
    "scallops", "seaweed_salad", "shrimp_and_grits", "spaghetti_bolognese", "spaghetti_carbonara",
    "spring_rolls", "steak", "strawberry_shortcake", "sushi", "tacos", "takoyaki", "tiramisu",
    "tuna_tartare", "waffles",
)  # fmt: skip
FOOD_CLASSES: tuple[str, ...] = tuple(n.replace("_", " ") for n in FOOD_RAW_NAMES)

# --- DTD: the folder names under images/ (already clean) --------------------------------------------
DTD_CLASSES: tuple[str, ...] = (
    "banded", "blotchy", "braided", "bubbly", "bumpy", "chequered", "cobwebbed", "cracked", "crosshatched",
    "crystalline", "dotted", "fibrous", "flecked", "freckled", "frilly", "gauzy", "grid", "grooved",
    "honeycombed", "interlaced", "knitted", "lacelike", "lined", "marbled", "matted", "meshed", "paisley",
    "perforated", "pitted", "pleated", "polka-dotted", "porous", "potholed", "scaly", "smeared", "spiralled",
    "sprinkled", "stained", "stratified", "striped", "studded", "swirly", "veined", "waffled", "woven",
    "wrinkled", "zigzagged",
)  # fmt: skip

# --- EuroSAT (RGB): the folder names, and the descriptive names used by CoOp -------------------------
EUROSAT_RAW_NAMES: tuple[str, ...] = (
    "AnnualCrop", "Forest", "HerbaceousVegetation", "Highway", "Industrial", "Pasture", "PermanentCrop",
    "Residential", "River", "SeaLake",
)  # fmt: skip
EUROSAT_CLASSES: tuple[str, ...] = (
    "Annual Crop Land", "Forest", "Herbaceous Vegetation Land", "Highway or Road", "Industrial Buildings",
    "Pasture Land", "Permanent Crop Land", "Residential Buildings", "River", "Sea or Lake",
)  # fmt: skip


FINE_GRAINED: list[BenchmarkSpec] = [
    BenchmarkSpec(
        name="stanford_cars",
        class_names=CARS_CLASSES,
        templates=(
            "a photo of a {}.",
            "a photo of the {}.",
            "a photo of my {}.",
            "i love my {}!",
            "a photo of my dirty {}.",
            "a photo of my clean {}.",
            "a photo of my new {}.",
            "a photo of my old {}.",
        ),
        noun="car model",
        raw_layout="devkit/cars_meta.mat, devkit/cars_train_annos.mat, cars_test_annos_withlabels.mat "
        "(in the root or devkit/), cars_train/*.jpg, cars_test/*.jpg; the root may also be a "
        "stanford_cars/ folder inside the given directory",
        source="car_devkit.tgz, cars_train.tgz, cars_test.tgz and cars_test_annos_withlabels.mat from "
        "https://ai.stanford.edu/~jkrause/cars/car_dataset.html (mirrors: Kaggle 'stanford-cars-dataset')",
        extra={"official_splits": "train / test (val carved from train)"},
    ),
    BenchmarkSpec(
        name="fgvc_aircraft",
        class_names=AIRCRAFT_VARIANTS,
        templates=("a photo of a {}, a type of aircraft.", "a photo of the {}, a type of aircraft."),
        noun="aircraft variant",
        raw_layout="fgvc-aircraft-2013b/data/: variants.txt, images_variant_{train,val,test}.txt "
        "('<image id> <variant>' per line), images/<image id>.jpg",
        source="fgvc-aircraft-2013b.tar.gz from https://www.robots.ox.ac.uk/~vgg/data/fgvc-aircraft/",
        extra={"official_splits": "train / val / test"},
    ),
    BenchmarkSpec(
        name="flowers102",
        class_names=FLOWERS_CLASSES,
        templates=("a photo of a {}, a type of flower.",),
        noun="flower species",
        raw_layout="imagelabels.mat (labels 1..102), setid.mat (trnid, valid, tstid), jpg/image_NNNNN.jpg",
        source="102flowers.tgz, imagelabels.mat, setid.mat from "
        "https://www.robots.ox.ac.uk/~vgg/data/flowers/102/",
        extra={"official_splits": "train / val / test (setid.mat)"},
    ),
    BenchmarkSpec(
        name="cub200",
        class_names=CUB_CLASSES,
        templates=("a photo of a {}, a type of bird.", "a photo of the {}, a type of bird."),
        noun="bird species",
        raw_layout="CUB_200_2011/: images.txt, image_class_labels.txt, train_test_split.txt, classes.txt, "
        "images/<NNN.Class_Name>/*.jpg",
        source="CUB_200_2011.tgz from https://www.vision.caltech.edu/datasets/cub_200_2011/ "
        "(data.caltech.edu/records/65de6-vs33)",
        extra={"raw_names": CUB_RAW_NAMES, "official_splits": "train / test (val carved from train)"},
    ),
    BenchmarkSpec(
        name="oxford_pets",
        class_names=PETS_CLASSES,
        templates=("a photo of a {}, a type of pet.",),
        noun="pet breed",
        raw_layout="annotations/trainval.txt, annotations/test.txt ('<image> <class id> <species> "
        "<breed id>' per line), images/<image>.jpg",
        source="images.tar.gz and annotations.tar.gz from https://www.robots.ox.ac.uk/~vgg/data/pets/",
        extra={"raw_names": PETS_RAW_NAMES, "official_splits": "trainval / test (val carved from trainval)"},
    ),
    BenchmarkSpec(
        name="food101",
        class_names=FOOD_CLASSES,
        templates=("a photo of {}, a type of food.",),
        noun="food",
        hub_name="ethz/food101",
        raw_layout="food-101/: meta/classes.txt, meta/train.json, meta/test.json "
        "({class: ['class/id', ...]}), images/<class>/<id>.jpg",
        source="food-101.tar.gz from https://data.vision.ee.ethz.ch/cvl/datasets_extra/food-101/",
        extra={"raw_names": FOOD_RAW_NAMES, "official_splits": "train / test (val carved from train)"},
    ),
    BenchmarkSpec(
        name="dtd",
        class_names=DTD_CLASSES,
        templates=(
            "a photo of a {} texture.",
            "a photo of a {} pattern.",
            "a photo of a {} thing.",
            "a photo of a {} object.",
            "a photo of the {} texture.",
            "a photo of the {} pattern.",
            "a photo of the {} thing.",
            "a photo of the {} object.",
        ),
        noun="texture",
        raw_layout="dtd/: labels/{train,val,test}<fold>.txt ('<class>/<image>.jpg' per line), "
        "images/<class>/*.jpg",
        source="dtd-r1.0.1.tar.gz from https://www.robots.ox.ac.uk/~vgg/data/dtd/",
        extra={"official_splits": "train / val / test of fold 1 (--fold picks 1..10)"},
    ),
    BenchmarkSpec(
        name="eurosat",
        class_names=EUROSAT_CLASSES,
        templates=(
            "a centered satellite photo of {}.",
            "a centered satellite photo of a {}.",
            "a centered satellite photo of the {}.",
        ),
        noun="land use type",
        raw_layout="2750/<Class>/<Class>_N.jpg (EuroSAT.zip) or EuroSAT_RGB/<Class>/<Class>_N.jpg; "
        "ten class folders",
        source="EuroSAT.zip (RGB) from https://github.com/phelber/EuroSAT (zenodo.org/records/7711810)",
        extra={
            "raw_names": EUROSAT_RAW_NAMES,
            "official_splits": "none: seeded class-stratified 50/20/30 train/val/test, or a CoOp split file",
        },
    ),
]

from ml_backend.model.sizing import choose_image_size


def test_typical_size_rounded_up_to_32_and_capped():
    assert choose_image_size([(28, 28)] * 5) == 32
    assert choose_image_size([(8, 8)]) == 32
    assert choose_image_size([(64, 48), (65, 40), (100, 100)]) == 96  # median larger side 65
    assert choose_image_size([(4000, 3000)] * 3 + [(10, 10)]) == 224
    assert choose_image_size([]) == 224

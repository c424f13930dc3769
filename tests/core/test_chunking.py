"""Cutting a streamed reply into speakable phrases."""

from app.core.chunking import ChunkSettings, PhraseChunker, speakable


def chunk(text: str, step: int = 1, settings: ChunkSettings | None = None) -> list[str]:
    chunker = PhraseChunker(settings)
    out = []
    for i in range(0, len(text), step):
        out += chunker.push(text[i : i + step])
    return out + chunker.flush()


def test_sentences_are_cut_at_their_ends():
    text = "Paris is the capital. It is on the Seine! Have you been there?"
    assert chunk(text) == ["Paris is the capital.", "It is on the Seine!", "Have you been there?"]


def test_a_phrase_is_emitted_as_soon_as_its_sentence_ends():
    chunker = PhraseChunker()
    # After a word the period ends the sentence at once: no waiting for the next token.
    assert chunker.push("The capital of France") == []
    assert chunker.push(" is Paris.") == ["The capital of France is Paris."]
    assert chunker.push(" Is it?") == ["Is it?"]
    # After a digit it may still become a decimal: the space decides.
    assert chunker.push(" It costs 4.") == []
    assert chunker.push("50 euros. And") == ["It costs 4.50 euros."]
    assert chunker.flush() == ["And"]


def test_a_first_clause_is_cut_at_its_comma_at_once_but_not_inside_a_number():
    chunker = PhraseChunker()
    assert chunker.push("It weighs 1,") == []
    assert chunker.push("000 kilograms,") == ["It weighs 1,000 kilograms,"]
    assert chunker.push(" more or less.") == ["more or less."]


def test_abbreviations_numbers_and_initials_do_not_end_sentences():
    text = "Dr. Smith paid $4.50 at 3 p.m. today, e.g. for J. R. R. Tolkien books. Done."
    phrases = chunk(text)
    assert phrases[-1] == "Done."
    assert "Dr. Smith paid $4.50" in phrases[0]
    assert all(not p.endswith(("Dr.", "e.g.", "J.", "$4.")) for p in phrases)


def test_first_clause_is_spoken_early_but_not_later_ones():
    text = "Well, the answer is simple, really, and it has three parts. After that, we rest, okay."
    phrases = chunk(text)
    assert phrases[0] == "Well, the answer is simple,"
    assert phrases[1] == "really, and it has three parts."
    assert phrases[2] == "After that, we rest, okay."


def test_long_sentences_split_at_a_comma_never_inside_a_word():
    settings = ChunkSettings(max_chars=60)
    text = ("This sentence keeps going for quite a while, because the model is chatty, "
            "and it does not stop talking about the weather near the mountains")
    phrases = chunk(text, step=3, settings=settings)
    assert len(phrases) >= 2
    assert " ".join(phrases) == speakable(text)
    assert all(len(p) <= 60 for p in phrases[:-1])


def test_markup_and_empty_phrases_are_dropped():
    assert chunk("**Hello** there. ... ") == ["Hello there."]
    assert chunk("  ") == []
    assert speakable("# Title\n* item one") == "Title item one"


def test_a_long_first_sentence_is_cut_before_a_word_that_opens_a_clause():
    text = "The sky is blue because of a process called Rayleigh scattering. It is so because light scatters."
    assert chunk(text) == ["The sky is blue", "because of a process called Rayleigh scattering.",
                           "It is so because light scatters."]  # only the first phrase is cut so
    chunker = PhraseChunker()
    assert chunker.push("The sky is blue because") == []  # "because" may still be "becauses..."
    assert chunker.push(" of") == ["The sky is blue"]
    # Too short to stand alone, or words that join words as often as clauses: no cut.
    assert chunk("So because of rain, we stay.") == ["So because of rain,", "we stay."]
    assert chunk("Paris is big and it is old.") == ["Paris is big and it is old."]

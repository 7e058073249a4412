"""Prompts and lengths shared by the serve tests (a module of its own: every conftest is named conftest)."""

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain photosynthesis in one sentence.",
    "List three primary colors.",
    "What is 12 times 7?",
    "Name a famous painter from Spain.",
    "How do bees make honey?",
    "Give me a synonym for happy.",
    "What does a compiler do?",
    "Translate 'good morning' into French.",
    "Why is the sky blue?",
    "Describe a cat in five words.",
    "What is the boiling point of water?",
    "Suggest a name for a pet turtle.",
    "What is the largest planet?",
    "Tell me a fun fact about octopuses.",
    "How many days are in a leap year?",
    "What is machine learning?",
    "Recommend a book for a long flight.",
    "What is the opposite of cold?",
    "In one short paragraph, describe the city number 7 of an imaginary country.",
]

MAX_NEW = 8

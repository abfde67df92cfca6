import { test } from "node:test";
import assert from "node:assert/strict";
import { slugify } from "../slugify.js";

test("lowercases and joins words", () => {
  assert.equal(slugify("Hello World"), "hello-world");
});

test("drops punctuation and repeated separators", () => {
  assert.equal(slugify("  Rock & Roll -- Live!  "), "rock-roll-live");
});

test("keeps accented letters as their ASCII base", () => {
  assert.equal(slugify("Crème Brûlée à la carte"), "creme-brulee-a-la-carte");
});

test("never cuts a word in half or ends with a separator", () => {
  assert.equal(slugify("alpha beta gamma delta", { maxLength: 13 }), "alpha-beta");
});

test("empty titles give an empty slug", () => {
  assert.equal(slugify("!!!"), "");
});

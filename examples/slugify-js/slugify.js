// URL slugs from arbitrary titles: lowercase ASCII words joined by a separator.

const DEFAULTS = { separator: "-", maxLength: 80 };

export function slugify(title, options = {}) {
  const { separator, maxLength } = { ...DEFAULTS, ...options };
  const words = title
    .toLowerCase()
    .replace(/[^a-z0-9]+/g, " ")
    .trim()
    .split(" ");
  let slug = words.join(separator);
  if (slug.length > maxLength) {
    slug = slug.slice(0, maxLength);
  }
  return slug;
}

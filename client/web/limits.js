// The server's limits (GET /v1/limits, app/transport/protocol.py published_limits): the range of every setting and
// live control, each control's neutral value, and the retry policy for a refused start. The page's fields carry no
// ranges of their own: they take them from here, so they span exactly what the server accepts and cannot drift.

/** Formats a limit as the page shows it: a real minus sign, no trailing zeros (-12 -> "−12", 1.0 -> "1"). */
function shown(value) {
  return String(value).replace("-", "−");
}

/**
 * Gives `element` the server's range ({min, max}) and, for a control, its neutral value (`default`, null = empty),
 * and writes the range into a `[data-range]` span of the element's label. An element the server has no limits for
 * (a server that predates the field) is disabled.
 */
export function applyLimits(element, limits) {
  if (!limits) {
    element.disabled = true;
    element.title = "The server does not offer this.";
    return;
  }
  if (typeof limits.min === "number") element.min = String(limits.min);
  if (typeof limits.max === "number") element.max = String(limits.max);
  if ("default" in limits) {
    if (element.type === "checkbox") {
      element.defaultChecked = limits.default === true;
      element.checked = element.defaultChecked;
    } else {
      element.defaultValue = limits.default === null ? "" : String(limits.default);
      element.value = element.defaultValue;
    }
  }
  const range = document.querySelector(`label[for="${element.id}"] [data-range]`);
  if (range && typeof limits.min === "number") range.textContent = `${shown(limits.min)}–${shown(limits.max)}`;
}

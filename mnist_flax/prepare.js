// predict.py's preparation of a digit image (read_grayscale, then to_mnist), step for step, for
// the static page, which has no Python to call. Its constants are predict.py's, passed in by the
// page from site.json, and its resize is Pillow's Lanczos on float pixels (Resample.c), so the
// page's 28x28 equals Python's: tests/test_site.py checks both on the same pixels.
(function (exports) {
  "use strict";

  // Python's round() and NumPy's np.round: halves go to the even neighbour.
  function roundHalfEven(x) {
    const r = Math.round(x);
    return Math.abs(x % 1) === 0.5 && r % 2 !== 0 ? r - 1 : r;
  }

  function sinc(x) {
    if (x === 0) return 1;
    x *= Math.PI;
    return Math.sin(x) / x;
  }

  function lanczos(x) {
    return -3 <= x && x < 3 ? sinc(x) * sinc(x / 3) : 0;
  }

  // Pillow's precompute_coeffs: for each output pixel, its first input pixel and normalised weights.
  function coefficients(inSize, outSize) {
    const scale = inSize / outSize, filterScale = Math.max(scale, 1), support = 3 * filterScale;
    const taps = [];
    for (let xx = 0; xx < outSize; xx++) {
      const center = (xx + 0.5) * scale;
      const xmin = Math.max(0, Math.trunc(center - support + 0.5));
      const xmax = Math.min(inSize, Math.trunc(center + support + 0.5));
      const weights = [];
      let total = 0;
      for (let x = xmin; x < xmax; x++) {
        const w = lanczos((x - center + 0.5) / filterScale);
        weights.push(w);
        total += w;
      }
      taps.push({xmin, weights: total !== 0 ? weights.map(w => w / total) : weights});
    }
    return taps;
  }

  // Image.resize((w, h), LANCZOS) of a mode "F" image: a horizontal pass, then a vertical one,
  // each summing in double precision and storing float32, as Pillow does.
  function resizeLanczos(src, h, w, outH, outW) {
    let cur = src, curW = w;
    if (outW !== w) {
      const taps = coefficients(w, outW), next = new Float32Array(h * outW);
      for (let y = 0; y < h; y++) {
        for (let xx = 0; xx < outW; xx++) {
          const {xmin, weights} = taps[xx];
          let s = 0;
          for (let i = 0; i < weights.length; i++) s += cur[y * curW + xmin + i] * weights[i];
          next[y * outW + xx] = s;
        }
      }
      cur = next; curW = outW;
    }
    if (outH !== h) {
      const taps = coefficients(h, outH), next = new Float32Array(outH * curW);
      for (let yy = 0; yy < outH; yy++) {
        const {xmin, weights} = taps[yy];
        for (let x = 0; x < curW; x++) {
          let s = 0;
          for (let i = 0; i < weights.length; i++) s += cur[(xmin + i) * curW + x] * weights[i];
          next[yy * curW + x] = s;
        }
      }
      cur = next;
    }
    return cur;
  }

  function border(gray, h, w) {
    const values = [];
    for (let x = 0; x < w; x++) values.push(gray[x]);
    for (let x = 0; x < w; x++) values.push(gray[(h - 1) * w + x]);
    for (let y = 1; y < h - 1; y++) values.push(gray[y * w]);
    for (let y = 1; y < h - 1; y++) values.push(gray[y * w + w - 1]);
    return values;
  }

  function median(values) {
    const s = Float64Array.from(values).sort(), n = s.length;
    return n % 2 ? s[(n - 1) / 2] : (s[n / 2 - 1] + s[n / 2]) / 2;
  }

  // predict.read_grayscale of RGBA pixels (a canvas' ImageData): Pillow's L (ITU-R 601-2 luma in
  // integers), with transparent pixels over a background opposite to the ink (flatten_alpha).
  function grayscale(rgba, h, w, c) {
    const n = h * w, lum = new Float32Array(n), alpha = new Float32Array(n);
    let opaque = true;
    for (let i = 0; i < n; i++) {
      const [r, g, b, a] = [rgba[4 * i], rgba[4 * i + 1], rgba[4 * i + 2], rgba[4 * i + 3]];
      lum[i] = (r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16;
      alpha[i] = a / 255;
      if (a < 255) opaque = false;
    }
    const gray = new Uint8Array(n);
    if (opaque) { gray.set(lum); return gray; }
    let ink = 0, covered = 0;
    for (let i = 0; i < n; i++) { ink += lum[i] * alpha[i]; covered += alpha[i]; }
    const background = ink / Math.max(covered, 1e-6) > c.invert_above ? 0 : 255;
    for (let i = 0; i < n; i++) gray[i] = roundHalfEven(lum[i] * alpha[i] + background * (1 - alpha[i]));
    return gray;
  }

  // predict.to_mnist: `gray` uint8 (h, w) -> {image: uint8 28x28 white on black, inverted}.
  // Throws, with predict.py's message, when there is no digit.
  function toMnist(gray, h, w, c) {
    const b0 = border(gray, h, w);
    const inverted = b0.reduce((s, v) => s + v, 0) / b0.length > c.invert_above;
    if (inverted) gray = gray.map(v => 255 - v);
    if (h === c.side && w === c.side) return {image: Uint8Array.from(gray), inverted};
    const background = median(border(gray, h, w));
    const x = new Float64Array(h * w);
    let max = 0;
    for (let i = 0; i < x.length; i++) { x[i] = Math.max(gray[i] - background, 0); max = Math.max(max, x[i]); }
    if (max < c.min_contrast) throw new Error("no digit found (the image is blank or nearly uniform)");
    let top = h, bottom = -1, left = w, right = -1;
    const factor = 255 / max;
    for (let y = 0; y < h; y++) {
      for (let xx = 0; xx < w; xx++) {
        const v = x[y * w + xx] *= factor;
        if (v > c.ink_fraction * 255) {
          top = Math.min(top, y); bottom = Math.max(bottom, y); left = Math.min(left, xx); right = Math.max(right, xx);
        }
      }
    }
    const ch = bottom - top + 1, cw = right - left + 1;
    const crop = new Float32Array(ch * cw);  // Image.fromarray stores the float64 crop as float32
    for (let y = 0; y < ch; y++) for (let xx = 0; xx < cw; xx++) crop[y * cw + xx] = x[(top + y) * w + left + xx];
    const scale = c.fit / Math.max(ch, cw);
    const sh = Math.max(1, roundHalfEven(ch * scale)), sw = Math.max(1, roundHalfEven(cw * scale));
    const small = resizeLanczos(crop, ch, cw, sh, sw).map(v => Math.min(Math.max(v, 0), 255));
    return {image: centerByMass(small, sh, sw, c.side, c.centre_decimals), inverted};
  }

  // predict.center_by_mass: the patch padded into side x side, its centre of mass at the centre.
  function centerByMass(patch, h, w, side, decimals) {
    let total = 0, my = 0, mx = 0;
    for (let y = 0; y < h; y++) {
      for (let x = 0; x < w; x++) { const v = patch[y * w + x]; total += v; my += v * y; mx += v * x; }
    }
    total = Math.max(total, 1e-6);
    const offset = centre => roundHalfEven(Math.round((side / 2 - centre) * 10 ** decimals) / 10 ** decimals);
    const top = Math.min(Math.max(offset(my / total), 0), side - h);
    const left = Math.min(Math.max(offset(mx / total), 0), side - w);
    const out = new Uint8Array(side * side);
    for (let y = 0; y < h; y++) for (let x = 0; x < w; x++) out[(top + y) * side + left + x] = roundHalfEven(patch[y * w + x]);
    return out;
  }

  exports.mnistPrepare = {grayscale, toMnist, roundHalfEven};
})(typeof module === "object" ? module.exports : window);

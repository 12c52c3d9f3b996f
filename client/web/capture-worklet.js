// AudioWorklet processor: cuts the microphone into 20 ms chunks of 48 kHz mono (960 samples) for the Opus encoder.
//
// The node is created with channelCount 1 / channelCountMode 'explicit', so the browser down-mixes a stereo mic
// (Chromium's fake device is 44.1 kHz stereo) before it reaches us. The AudioContext normally runs at 48 kHz; when a
// browser cannot open the mic in a 48 kHz context (older Firefox refuses to mix sample rates), the page falls back to
// the device's rate and this processor resamples to 48 kHz by linear interpolation.
//
// Each chunk is posted as {samples: Float32Array(960), time}: `time` is the AudioContext time (seconds) at which
// the chunk's first sample was captured, so the page can relate output playback to input capture on one clock.

const TARGET_RATE = 48000;
const CHUNK = 960; // 20 ms at 48 kHz: one Opus frame

class CaptureProcessor extends AudioWorkletProcessor {
  constructor() {
    super();
    this.chunk = new Float32Array(CHUNK);
    this.filled = 0;
    this.chunkTime = 0;
    this.step = sampleRate / TARGET_RATE; // input samples per output sample; 1 at 48 kHz
    this.position = 0; // resampler read position, relative to the current quantum's first sample
    this.previous = 0; // the last input sample of the previous quantum, for interpolation across quanta
    this.running = true;
    this.port.onmessage = (event) => {
      if (event.data === "stop") this.running = false;
    };
  }

  push(sample, time) {
    if (this.filled === 0) this.chunkTime = time;
    this.chunk[this.filled++] = sample;
    if (this.filled === CHUNK) {
      const samples = this.chunk;
      this.port.postMessage({ samples, time: this.chunkTime }, [samples.buffer]);
      this.chunk = new Float32Array(CHUNK);
      this.filled = 0;
    }
  }

  process(inputs) {
    if (!this.running) return false;
    // No input connected (yet): keep time going with silence so that chunk times stay contiguous.
    const channel = inputs[0] && inputs[0].length > 0 ? inputs[0][0] : new Float32Array(128);
    if (this.step === 1) {
      for (let i = 0; i < channel.length; i++) this.push(channel[i], currentTime + i / sampleRate);
      return true;
    }
    // Linear interpolation; position -1 stands for the previous quantum's last sample.
    while (this.position < channel.length - 1) {
      const index = Math.floor(this.position);
      const fraction = this.position - index;
      const a = index < 0 ? this.previous : channel[index];
      const b = channel[index + 1];
      this.push(a + (b - a) * fraction, currentTime + Math.max(this.position, 0) / sampleRate);
      this.position += this.step;
    }
    this.position -= channel.length;
    this.previous = channel[channel.length - 1];
    return true;
  }
}

registerProcessor("capture-processor", CaptureProcessor);

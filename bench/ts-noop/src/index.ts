import { createAction, createPiece, PieceAuth, Property } from '@activepieces/pieces-framework';

const noop = createAction({
  name: 'noop',
  displayName: 'No-op',
  description: 'Returns its input',
  props: { value: Property.Number({ displayName: 'Value', required: false }) },
  async run(context) {
    return { value: context.propsValue.value };
  },
});

export const tsNoop = createPiece({
  displayName: 'TypeScript no-op',
  auth: PieceAuth.None(),
  minimumSupportedRelease: '0.30.0',
  logoUrl: 'https://example.invalid/noop.png',
  authors: ['piecework'],
  actions: [noop],
  triggers: [],
});

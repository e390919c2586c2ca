import { createPiece } from '@activepieces/pieces-framework';
import { companyAuth } from './lib/auth';
import { createTicketAction } from './lib/actions/create-ticket';
import { healthCheckAction } from './lib/actions/health-check';
import { newTicketTrigger } from './lib/triggers/new-ticket';

export const myCompanyApi = createPiece({
  displayName: 'My Company API',
  description: 'Internal company API integration',
  auth: companyAuth,
  logoUrl: 'https://cdn.company.example/logo.png',
  authors: ['platform-team'],
  minimumSupportedRelease: '0.30.0',
  actions: [createTicketAction, healthCheckAction],
  triggers: [newTicketTrigger],
});
